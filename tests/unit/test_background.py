"""Background responses on chat-only backends, sans-IO: refusals, the queued answer and its record, the
run's request, its outcome under the queued id, cancellation."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.envoy.names import H_FOLLOW
from extproc.errors import GatewayError
from extproc.exchange import Exchange, Lookup
from extproc.routing.gateway import Gateway
from extproc.state import records as rec
from extproc.state.background import Follow, cancel_key, lease_key, outcome_writes
from extproc.state.lookup import start

from .exchanges import answered
from .test_state_flow import CFG

HEADERS = {":method": "POST", ":path": "/v1/responses", "content-type": "application/json",
           "authorization": "Bearer k1", "x-request-id": "r", "x-envoy-expected-rq-timeout-ms": "5", "user-agent": "sdk"}


@pytest.fixture
def gateway():
    return Gateway(parse_config(CFG, env={}))


def create(gateway, body: dict, store: dict | None = None):
    ex = Exchange(gateway)
    ex.request_headers(HEADERS, False)
    return ex, answered(ex.request_body(json.dumps(body).encode()), store or {})


def test_a_chat_model_gets_a_queued_response_at_once_and_a_run(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "think hard", "background": True, "temperature": 0.2})
    status, body, _ = act.immediate
    queued = json.loads(body)
    assert status == 200 and queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    run = act.background
    assert run.id == queued["id"] and act.done
    # sent as a stream, whatever the client asked: the run follows the events (and logs them if asked)
    assert run.request == {"model": "llama-3", "input": "think hard", "temperature": 0.2, "store": False,
                           "stream": True}
    assert not run.streams
    assert run.headers == {"authorization": "Bearer k1", "user-agent": "sdk"}
    (key, raw), owner = act.writes
    assert key == f"turn:{ex.req.pinning.tenant}:{run.id}" and json.loads(raw)["response"] == queued
    assert owner == (f"owner:{run.id}", ex.req.pinning.tenant.encode())


def test_the_outcome_is_recorded_under_the_queued_id_unless_cancelled(gateway):
    _, act = create(gateway, {"model": "llama-3", "input": "x", "background": True})
    run, store = act.background, dict(act.writes)
    answer = {"id": "resp_inner", "object": "response", "status": "completed", "created_at": 5, "background": False,
              "store": False, "output": [{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                                          "content": [{"type": "output_text", "text": "y", "annotations": []}]}]}
    done = run.finished(200, json.dumps(answer).encode())
    assert done == {**answer, "id": run.id, "created_at": run.response["created_at"], "background": True, "store": True}
    failed = run.finished(500, b'{"error": {"message": "boom", "code": "server_error"}}')
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error", "message": "boom"}
    assert run.finished(200, b"not json")["error"]["code"] == "bad_upstream_response"
    ((key, raw), _) = outcome_writes(run, done, store[run.key])
    assert key == run.key
    assert rec.load_turn(raw)["response"]["status"] == "completed" and rec.load_turn(raw)["input"][0]["id"]
    assert outcome_writes(run, done, None) == []  # deleted meanwhile: stays deleted
    # Cancelled meanwhile (through the exchange, as a client would): the cancellation is kept.
    cancel = Exchange(gateway)
    step = cancel.request_headers({**HEADERS, ":path": f"/v1/responses/{run.id}/cancel"}, True)
    out = step.then([store.get(k) for k in step.keys])
    assert json.loads(out.immediate[1])["status"] == "cancelled"
    store.update(out.writes)
    assert outcome_writes(run, done, store[run.key]) == []
    again = start(cancel.req.pinning.resource("POST", run.id, "/cancel", ""))  # a finished one is answered as it is
    assert json.loads(again.then([store.get(k) for k in again.keys]).body)["status"] == "cancelled"


def test_cancelling_a_response_that_is_not_a_background_one_is_openais_400(gateway):
    store = {"turn:anonymous:r1": rec.turn_record({"id": "r1", "status": "completed", "output": []}, [], [], None)}
    ex = Exchange(gateway)
    step = ex.request_headers({":method": "POST", ":path": "/v1/responses/r1/cancel"}, True)
    with pytest.raises(GatewayError) as e:
        step.then([store.get(k) for k in step.keys])
    assert e.value.status == 400 and "background=true" in e.value.message


@pytest.mark.parametrize(("extra", "param"), [({"store": False}, "store"), ({"conversation": "conv_1"}, "conversation")])
def test_what_a_background_run_cannot_be_is_refused(gateway, extra, param):
    with pytest.raises(GatewayError) as e:
        create(gateway, {"model": "llama-3", "input": "x", "background": True, **extra})
    assert (e.value.status, e.value.param) == (400, param)


def test_a_background_stream_needs_the_front_door():
    off = Gateway(parse_config(CFG + "websocket_listen: off\n", env={}))
    with pytest.raises(GatewayError) as e:
        create(off, {"model": "llama-3", "input": "x", "background": True, "stream": True})
    assert (e.value.status, e.value.param) == (400, "stream") and "websocket_listen" in e.value.message


def follow_of(act) -> Follow:
    (name, ticket), = act.set_headers
    assert name == H_FOLLOW and act.immediate is None and act.clear_route_cache and act.done
    follow = Follow.opened(ticket, Gateway(parse_config(CFG, env={})).sealer)  # another replica opens it
    assert follow is not None
    return follow


def test_a_background_stream_is_sent_to_the_front_door_with_its_log_started(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "x", "background": True, "stream": True})
    run, tenant = act.background, ex.req.pinning.tenant
    assert run.streams and follow_of(act) == Follow(tenant, run.id, -1)
    store = dict(act.writes)
    assert json.loads(store[run.key])["events"] is True
    first = store[f"bgev:{tenant}:{run.id}:0"]
    assert first.startswith(b"event: response.created\ndata: ")
    created = json.loads(first.split(b"data: ", 1)[1])
    assert (created["sequence_number"], created["response"]["status"], created["response"]["id"]) == (0, "queued", run.id)
    assert set(store) == {run.key, f"owner:{run.id}", f"bgev:{tenant}:{run.id}:0"}  # no end yet


def resume(gateway, path: str, store: dict | None, key: str = "k1"):
    """A GET through a fresh exchange; None as the store: it is down."""
    ex = Exchange(gateway)
    return answered(ex.request_headers({":method": "GET", ":path": path, "authorization": f"Bearer {key}"}, True), store)


def test_a_resume_is_sent_to_the_front_door_for_its_tenant_only(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "x", "background": True, "stream": True})
    run, store = act.background, dict(act.writes)
    tenant = ex.req.pinning.tenant
    assert follow_of(resume(gateway, f"/v1/responses/{run.id}?stream=true&starting_after=7", store)) == \
        Follow(tenant, run.id, 7)
    assert follow_of(resume(gateway, f"/v1/responses/{run.id}?stream=true", store)).after == -1
    leased = {**store, lease_key(tenant, run.id): b"1"}  # its run alive
    polled = resume(gateway, f"/v1/responses/{run.id}?stream=false", leased)  # no stream: the Response
    assert json.loads(polled.immediate[1])["status"] == "queued"
    with pytest.raises(GatewayError) as e:
        resume(gateway, f"/v1/responses/{run.id}?stream=true", store, key="k2")
    assert (e.value.status, e.value.code) == (404, "response_not_found")
    for bad in ("-1", "x", ""):
        with pytest.raises(GatewayError) as e:
            resume(gateway, f"/v1/responses/{run.id}?stream=true&starting_after={bad}", store)
        assert (e.value.status, e.value.param) == (400, "starting_after")


def test_a_poll_of_a_run_whose_lease_lapsed_records_it_failed_and_fences_the_run(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "x", "background": True})
    run, store = act.background, dict(act.writes)
    tenant = ex.req.pinning.tenant
    writes, ttl = run.lease(gateway.config.limits)
    assert writes == [(lease_key(tenant, run.id), b"1")] and ttl == 15  # limits.background_lease_seconds
    alive = resume(gateway, f"/v1/responses/{run.id}", {**store, **dict(writes)})
    assert json.loads(alive.immediate[1])["status"] == "queued" and alive.writes == []
    lost = resume(gateway, f"/v1/responses/{run.id}", store)  # no lease: its replica stopped renewing it
    answered = json.loads(lost.immediate[1])
    assert (answered["id"], answered["status"]) == (run.id, "failed")
    assert answered["error"] == {"code": "background_run_lost", "message": "the gateway replica running this "
                                 "background response stopped before it finished"}
    assert [k for k, _ in lost.writes] == [cancel_key(tenant, run.id), run.key]  # the mark first: the run stops
    store.update(lost.writes)
    assert rec.load_turn(store[run.key])["response"] == answered  # its input kept
    assert rec.load_turn(store[run.key])["input"] == rec.load_turn(dict(act.writes)[run.key])["input"]
    again = resume(gateway, f"/v1/responses/{run.id}", store)  # failed now: no lease read, answered as it is
    assert json.loads(again.immediate[1]) == answered and again.writes == []


def test_a_lease_read_the_store_does_not_answer_judges_nothing(gateway):
    _, act = create(gateway, {"model": "llama-3", "input": "x", "background": True})
    run, store = act.background, dict(act.writes)
    ex = Exchange(gateway)
    step = ex.request_headers({**HEADERS, ":method": "GET", ":path": f"/v1/responses/{run.id}"}, True)
    step = step.then([store.get(k) for k in step.keys])  # the turn read
    assert isinstance(step, Lookup) and step.keys == (lease_key(ex.req.pinning.tenant, run.id),)
    act = step.then(None)  # the store down for the lease read
    assert json.loads(act.immediate[1])["status"] == "queued" and act.writes == []


def test_a_finished_turn_is_not_checked_for_a_lease(gateway):
    done = {"id": "r1", "object": "response", "status": "completed", "background": True, "output": []}
    store = {"turn:anonymous:r1": rec.turn_record(done, [], [], None)}
    ex = Exchange(gateway)
    step = ex.request_headers({":method": "GET", ":path": "/v1/responses/r1"}, True)
    act = step.then([store.get(k) for k in step.keys])  # one read: the answer at once
    assert json.loads(act.immediate[1]) == done and act.writes == []


def test_only_a_streamed_background_response_can_be_streamed_again(gateway):
    _, act = create(gateway, {"model": "llama-3", "input": "x", "background": True})
    with pytest.raises(GatewayError) as e:
        resume(gateway, f"/v1/responses/{act.background.id}?stream=true", dict(act.writes))
    assert e.value.status == 400 and "stream=true" in e.value.message


def test_a_ticket_is_this_gateways_and_this_tenants():
    sealer = Gateway(parse_config(CFG, env={})).sealer
    ticket = Follow("t1", "resp_1", 3).ticket(sealer)
    assert Follow.opened(ticket, sealer) == Follow("t1", "resp_1", 3)
    assert Follow.opened("t2;" + ticket.partition(";")[2], sealer) is None  # another tenant's name on it
    assert Follow.opened("t1;resp_1;3", sealer) is None and Follow.opened("", sealer) is None


def test_cancelling_leaves_the_mark_the_run_watches(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "x", "background": True, "stream": True})
    run, store = act.background, dict(act.writes)
    cancel = Exchange(gateway)
    step = cancel.request_headers({**HEADERS, ":path": f"/v1/responses/{run.id}/cancel"}, True)
    out = dict(step.then([store.get(k) for k in step.keys]).writes)
    assert out[cancel_key(ex.req.pinning.tenant, run.id)] == b"1"
    assert json.loads(out[run.key])["events"] is True  # still a streamed one: its log can be read to its end


def test_a_responses_backend_takes_background_itself(gateway):
    _, act = create(gateway, {"model": "gpt-oss-1", "input": "x", "background": True, "stream": True})
    assert act.background is None and act.immediate is None and act.body is None  # passed through, as sent


def test_a_cancel_racing_the_runs_last_round_trip_wins(gateway):
    """The run read its record (still in progress) and is about to write `completed` when the cancel
    lands: the cancel mark, written before the cancelled record, refuses the run's write."""
    import asyncio

    from extproc.state.store import MemoryStore

    _, act = create(gateway, {"model": "llama-3", "input": "x", "background": True})
    run = act.background
    store = MemoryStore(ttl=60, max_entries=100)

    async def go() -> dict:
        await store.write(act.writes)
        done = {**run.response, "status": "completed", "output": []}
        writes = outcome_writes(run, done, (await store.get_many((run.key,)))[0])  # read before the cancel
        assert writes
        cancel = Exchange(gateway)
        step = cancel.request_headers({**HEADERS, ":path": f"/v1/responses/{run.id}/cancel"}, True)
        out = step.then(await store.get_many(tuple(step.keys)))
        mark = cancel_key(cancel.req.pinning.tenant, run.id)
        assert out.writes[0] == (mark, b"1")  # the mark before the record: a write between them is overwritten
        await store.write(out.writes)
        assert await store.write_unless(mark, writes) is False
        return rec.load_turn((await store.get_many((run.key,)))[0])

    assert asyncio.run(go())["response"]["status"] == "cancelled"
