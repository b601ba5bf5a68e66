"""Background responses on chat-only backends, sans-IO: refusals, the queued answer and its record, the
run's request, its outcome under the queued id, cancellation."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange, Lookup
from extproc.routing.gateway import Gateway
from extproc.state import records as rec
from extproc.state.background import outcome_writes
from extproc.state.lookup import start

from .test_state_flow import CFG

HEADERS = {":method": "POST", ":path": "/v1/responses", "content-type": "application/json",
           "authorization": "Bearer k1", "x-request-id": "r", "x-envoy-expected-rq-timeout-ms": "5", "user-agent": "sdk"}


@pytest.fixture
def gateway():
    return Gateway(parse_config(CFG, env={}))


def create(gateway, body: dict, store: dict | None = None):
    ex = Exchange(gateway)
    ex.request_headers(HEADERS, False)
    step = ex.request_body(json.dumps(body).encode())
    while isinstance(step, Lookup):
        step = step.then([(store or {}).get(k) for k in step.keys])
    return ex, step


def test_a_chat_model_gets_a_queued_response_at_once_and_a_run(gateway):
    ex, act = create(gateway, {"model": "llama-3", "input": "think hard", "background": True, "temperature": 0.2})
    status, body, _ = act.immediate
    queued = json.loads(body)
    assert status == 200 and queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    run = act.background
    assert run.id == queued["id"] and act.done
    assert run.request == {"model": "llama-3", "input": "think hard", "temperature": 0.2, "store": False}
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


@pytest.mark.parametrize(("extra", "param"), [({"stream": True}, "stream"), ({"store": False}, "store"),
                                              ({"conversation": "conv_1"}, "conversation")])
def test_what_a_background_run_cannot_be_is_refused(gateway, extra, param):
    with pytest.raises(GatewayError) as e:
        create(gateway, {"model": "llama-3", "input": "x", "background": True, **extra})
    assert (e.value.status, e.value.param) == (400, param)


def test_a_responses_backend_takes_background_itself(gateway):
    _, act = create(gateway, {"model": "gpt-oss-1", "input": "x", "background": True, "stream": True})
    assert act.background is None and act.immediate is None and act.body is None  # passed through, as sent
