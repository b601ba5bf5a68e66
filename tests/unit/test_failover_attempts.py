"""Failover's mechanism, sans-IO: the hand-over, each attempt on its member, and the compiled group cluster."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import BUFFERED, Exchange
from extproc.exchange.failover import GroupAttempt, Hold, attempt_key, record_key
from extproc.routing import group_routes
from extproc.routing.compile import compile_routes
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge
from extproc.state import records as rec
from extproc.state.lookup import Lookup
from extproc.state.pinning import response_pin

CFG = """
failover: {max_attempts: 3}
backends:
  - name: keyed-chat
    api: chat
    models: ["g", "solo"]
    endpoints: ["10.0.0.1:8000"]
    api_key_env: POOL_KEY
  - name: resp
    api: responses
    models: ["g"]
    endpoints: ["10.0.0.2:8000", "10.0.0.3:8000"]
  - name: hosted
    url: https://api.example.com
    api: chat
    models: ["h", "solo-hosted"]
  - name: other
    api: chat
    models: ["h"]
    endpoints: ["10.0.0.4:8000"]
"""
CLIENT = {":method": "POST", ":path": "/v1/responses", ":authority": "gw", "content-type": "application/json",
          "authorization": "Bearer client-key", "x-request-id": "rid"}
BODY = {"model": "g", "input": "hi"}


def gateway() -> Gateway:
    return Gateway(parse_config(CFG, env={"POOL_KEY": "sk-pool"}), tenant_secret=b"s" * 32)


def resolve(step, store: dict[str, bytes]):
    while isinstance(step, Lookup):
        step = step.then([store.get(k) for k in step.keys])
    store.update({k: v for k, v in step.writes if v is not None})
    return step


def hand_over(gw: Gateway, store: dict[str, bytes], body: dict = BODY) -> dict[str, str]:
    """The client side: the request's headers as its attempts see them (Envoy's map after the processor)."""
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(body).encode()), store)
    assert not act.done and act.body is None and ex.handed_over  # untranslated: each attempt translates; the
    # answer's headers come back (Envoy's own reply replaced)
    sets = dict(act.set_headers)
    assert sets["x-gateway-cluster"] == "group.keyed-chat.resp"
    return {**CLIENT, "x-gateway-failover": sets["x-gateway-failover"]}


def test_a_model_outside_any_group_is_not_handed_over():
    gw, store = gateway(), {}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps({"model": "solo", "input": "hi"}).encode()), store)
    assert not ex.handed_over and ("x-gateway-destination-endpoint", "10.0.0.1:8000") in act.set_headers
    assert not any(k.startswith("failover:") for k in store)


def test_the_record_is_sealed():
    gw, store = gateway(), {}
    hand_over(gw, store)
    (raw,) = [v for k, v in store.items() if k.startswith("failover:")]
    assert b"client-key" not in raw and b"Bearer" not in raw


def _cluster_named(gw: Gateway, body: dict, store: dict[str, bytes] | None = None) -> str:
    ex, store = Exchange(gw), {} if store is None else store
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(body).encode()), store)
    assert ex.handed_over
    return dict(act.set_headers)["x-gateway-cluster"]


def test_a_member_held_off_by_retry_after_is_not_the_first_attempt():
    gw = gateway()
    gw.health.record("keyed-chat", False, gw.clock(), retry_after=30)
    assert _cluster_named(gw, BODY) == "group.resp.keyed-chat"  # the held one is tried last, not first
    gw.health.record("keyed-chat", True, gw.clock())  # it answered again: back in front
    assert _cluster_named(gw, BODY) == "group.keyed-chat.resp"


WEIGHTED = CFG.replace("    api_key_env: POOL_KEY\n", "    api_key_env: POOL_KEY\n    weight: 1\n").replace(
    '    endpoints: ["10.0.0.2:8000", "10.0.0.3:8000"]\n', '    endpoints: ["10.0.0.2:8000", "10.0.0.3:8000"]\n    weight: 3\n')


def test_weights_spread_first_attempts_by_placement_key_and_one_key_stays():
    gw = Gateway(parse_config(WEIGHTED, env={"POOL_KEY": "sk-pool"}), tenant_secret=b"s" * 32)
    firsts = [_cluster_named(gw, {**BODY, "prompt_cache_key": f"conv-{i}"}) for i in range(400)]
    share = firsts.count("group.resp.keyed-chat") / len(firsts)
    # weights 1:3 give the second member 3/4 of first attempts; 400 keys: 4 standard deviations is 0.087
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5
    assert {_cluster_named(gw, {**BODY, "prompt_cache_key": "conv-7"}) for _ in range(5)} == {firsts[7]}


def attempt(gw: Gateway, store: dict[str, bytes], headers: dict[str, str], n: int, host: str,
            body: dict = BODY, named: str = "") -> GroupAttempt:
    a = GroupAttempt(gw, host, named)
    a.head = resolve(a.request_headers({**headers, "x-envoy-attempt-count": str(n)}, False), store)
    a.body_act = resolve(a.request_body(json.dumps(body).encode()), store)
    return a


CHATS = """
failover: {max_attempts: 3}
backends:
  - name: chat-a
    api: chat
    models: ["c"]
    endpoints: ["10.0.1.1:8000"]
  - name: chat-b
    api: chat
    models: ["c"]
    endpoints: ["10.0.1.2:8000"]
"""
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "c",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "seven"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def test_a_held_conversation_goes_first_to_the_member_that_served_its_last_turn():
    gw, store = Gateway(parse_config(CHATS), tenant_secret=b"s" * 32), {}
    turn1 = {"model": "c", "input": "remember 7"}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(turn1).encode()), store)
    assert dict(act.set_headers)["x-gateway-cluster"] == "group.chat-a.chat-b"  # config order: no turn yet
    headers = {**CLIENT, "x-gateway-failover": dict(act.set_headers)["x-gateway-failover"]}
    first = attempt(gw, store, headers, 1, "10.0.1.1:8000", turn1)
    first.response_headers({":status": "503"})
    resolve(first.response_body(b'{"error": {"message": "overloaded"}}', True), store)  # failed over to chat-b
    second = attempt(gw, store, headers, 2, "10.0.1.2:8000", turn1)
    second.response_headers({":status": "200", "content-type": "application/json"})
    answer = resolve(second.response_body(json.dumps(COMPLETION).encode(), True), store)
    response_id = orjson.loads(answer.body or b"{}")["id"]  # the Response the sidecar made, and holds
    turn2 = {"model": "c", "input": "what number?", "previous_response_id": response_id}
    # chat-a is in again (one 503 ejects nobody), but the conversation stays where its last turn was served
    assert _cluster_named(gw, turn2, store) == "group.chat-b.chat-a"
    gw.health.record("chat-b", False, gw.clock(), retry_after=30)  # held off: the policy's order again
    assert _cluster_named(gw, turn2, store) == "group.chat-a.chat-b"


def test_each_attempt_runs_on_its_member_and_a_failure_is_marked_for_envoys_retry():
    gw, store = gateway(), {}
    headers = hand_over(gw, store)
    first = attempt(gw, store, headers, 1, "10.0.0.1:8000")
    sets = dict(first.body_act.set_headers)
    assert sets[":path"] == "/v1/chat/completions" and sets["authorization"] == "Bearer sk-pool"
    assert not first.body_act.done  # the answer is judged
    assert first.response_headers({":status": "503"}).response_body_mode == BUFFERED
    act = first.response_body(b'{"error": {"message": "overloaded"}}', True)
    assert ("x-gateway-retry", "1") in act.set_headers and act.done and act.body is None
    assert [(a.backend, a.outcome) for a in first.attempts] == [("keyed-chat", "failed")]
    # the header map Envoy retries from carries attempt 1's changes: attempt 2 puts the client's back
    changed = {**headers, ":path": "/v1/chat/completions", "authorization": "Bearer sk-pool",
               "content-length": "999", "accept-encoding": "identity"}
    second = attempt(gw, store, changed, 2, "10.0.0.3:8000")
    restored = dict(second.head.set_headers)
    assert restored["authorization"] == "Bearer client-key" and restored[":path"] == "/v1/responses"
    assert "content-length" in second.head.remove_headers and "accept-encoding" in second.head.remove_headers
    assert "x-gateway-failover" not in second.head.remove_headers  # every attempt reads it
    assert second.body_act.body is None  # a Responses member takes the client's request as it is
    assert second.ex is not None and second.ex.target.endpoint == "10.0.0.3:8000"  # Envoy's choice


def test_a_final_error_is_not_failed_over():
    gw, store = gateway(), {}
    a = attempt(gw, store, hand_over(gw, store), 1, "10.0.0.1:8000")
    a.response_headers({":status": "400", "content-type": "application/json"})
    act = a.response_body(b'{"error": {"message": "bad temperature"}}', True)
    assert ("x-gateway-retry", "1") not in act.set_headers and a.served is a.ex
    assert b"bad temperature" in (act.body or b"")  # translated into the client's error shape


def test_the_last_attempt_names_every_one_including_those_that_got_no_answer():
    gw, store = gateway(), {}
    headers = hand_over(gw, store)
    # attempt 1 (keyed-chat) got no answer: a refused connection never reaches the processor
    last = attempt(gw, store, headers, 2, "10.0.0.2:8000")
    assert [(a.backend, a.outcome) for a in last.attempts] == [("keyed-chat", "reset")]
    last.response_headers({":status": "500"})
    act = last.response_body(b'{"error": {"message": "crashed"}}', True)
    error = orjson.loads(act.body or b"{}")["error"]
    assert (":status", "502") in act.set_headers and error["code"] == "all_backends_failed"
    assert "keyed-chat: no answer" in error["message"] and "resp: 500 crashed" in error["message"]
    # one more attempt than the members (Envoy retried a refused last connection): answered at once
    store[attempt_key(headers["x-gateway-failover"], 2)] = orjson.dumps(
        {"backend": "resp", "status": 500, "message": "crashed", "retry_after": None, "began": time.time()})
    extra = GroupAttempt(gw, "10.0.0.1:8000")
    with pytest.raises(Exception, match="every backend of model 'g' failed"):
        resolve(extra.request_headers({**headers, "x-envoy-attempt-count": "3"}, False), store)


def test_an_attempt_given_up_on_after_its_timeout_is_told_from_a_reset_by_its_length(monkeypatch):
    """Envoy tells an attempt only its number: a silent attempt before it that lasted the attempt
    timeout (30 s here) was given up on by Envoy, one that ended sooner was refused or reset. Each
    attempt after the first records when it began, so two silent attempts in a row are both told by
    their length; the last one timing out makes the all-failed error a 504."""
    gw, store = gateway(), {}
    headers = hand_over(gw, store)
    rid, start = headers["x-gateway-failover"], time.time()
    monkeypatch.setattr(time, "time", lambda: start + 1)  # attempt 1 ended after a second: refused or reset
    early = attempt(gw, store, headers, 2, "10.0.0.2:8000")
    assert [(a.backend, a.outcome) for a in early.attempts] == [("keyed-chat", "reset")]
    assert orjson.loads(store[attempt_key(rid, 2)]) == {"backend": "resp", "began": start + 1}  # its own start
    store.pop(attempt_key(rid, 2))  # (as if that attempt 2 had not been: the same attempt 1, told by time)
    monkeypatch.setattr(time, "time", lambda: start + 30)
    second = attempt(gw, store, headers, 2, "10.0.0.2:8000")
    assert [(a.backend, a.outcome) for a in second.attempts] == [("keyed-chat", "timeout")]
    # attempt 2 silent too, 30 s after it began: Envoy's one more attempt answers 504, naming both timed out
    monkeypatch.setattr(time, "time", lambda: start + 60)
    extra = GroupAttempt(gw, "10.0.0.1:8000")
    with pytest.raises(GatewayError) as e:
        resolve(extra.request_headers({**headers, "x-envoy-attempt-count": "3"}, False), store)
    assert (e.value.status, e.value.code) == (504, "all_backends_timed_out")
    assert "keyed-chat: timed out" in e.value.message and "resp: timed out" in e.value.message
    assert [(a.backend, a.outcome) for a in extra.attempts] == [("resp", "timeout")]  # counted once, here


S = 30  # the attempt timeout of `told`'s cases


def _rec(backend: str, began: float, **outcome: object) -> bytes:
    return orjson.dumps({"backend": backend, "began": began, **outcome})


@pytest.mark.parametrize(("values", "now", "told", "unseen"), [
    # the first refused (a moment), the second began and was silent for its timeout
    ([None, _rec("b", 0.01)], S + 0.02, [("a", "reset"), ("b", "timeout")], ["b"]),
    # the second never reached its processor: Envoy's connection failed; the first was silent before it
    ([None, None], S + 0.01, [("a", "timeout"), ("b", "connect_failure")], ["a", "b"]),
    # both silent, one after the other, the second's start recorded by itself
    ([None, _rec("b", S)], 2 * S, [("a", "timeout"), ("b", "timeout")], ["b"]),
    # a judged answer (counted by its processor), then a reset
    ([_rec("a", 0, status=503, message="busy", error=None, retry_after=None), _rec("b", 0.1)], 0.2,
     [("a", "failed"), ("b", "reset")], ["b"]),
    # a refused one between two seen ones ends when the next one began: the first lasted its timeout
    ([None, None, _rec("c", S)], S + 0.1, [("a", "timeout"), ("b", "connect_failure"), ("c", "reset")], ["c"]),
    # the second's record names its member: the first is the one nobody named, in priority order
    ([None, _rec("a", 0.01)], 0.02, [("b", "reset"), ("a", "reset")], ["a"]),
])
def test_the_records_tell_each_attempt_that_got_no_answer(values, now, told, unseen):
    from extproc.exchange.failover import told as tell

    attempts, not_seen = tell(values, ["a", "b", "c"], 0.0, now, S)
    assert [(a.backend, a.outcome) for a in attempts] == told
    assert [a.backend for a in not_seen] == unseen


def test_the_client_side_replaces_envoys_own_reply_with_the_error_naming_each_attempt():
    """No attempt's processor answered (the last attempt refused): Envoy's reply reaches the exchange
    that handed the request over, which answers with the error built from the attempts' records; an
    answer an attempt let go (its mark) goes on untouched, whatever its status."""
    gw, store = gateway(), {}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(BODY).encode()), store)
    rid = dict(act.set_headers)["x-gateway-failover"]
    store[attempt_key(rid, 2)] = _rec("resp", time.time())  # attempt 2 reached its processor, then reset
    with pytest.raises(GatewayError) as e:
        resolve(ex.response_headers({":status": "503", "content-type": "application/json"}), store)
    assert (e.value.status, e.value.code) == (502, "all_backends_failed")
    assert e.value.message == ("every backend of model 'g' failed (2 attempts): keyed-chat: no answer (connection "
                               "refused or reset); resp: no answer (connection refused or reset)")
    assert [(a.backend, a.outcome) for a in ex.unseen_attempts] == [("resp", "reset")]
    for status in ("200", "502"):
        ex = Exchange(gw)
        resolve(ex.request_headers(dict(CLIENT), False), store)
        resolve(ex.request_body(json.dumps(BODY).encode()), store)
        act = resolve(ex.response_headers({":status": status, "x-gateway-answered": "1"}), store)
        assert act.done and not act.set_headers and act.immediate is None and act.body is None


def _handed(gw: Gateway, path: str, body: dict) -> bool:
    ex = Exchange(gw)
    resolve(ex.request_headers({**CLIENT, ":path": path}, False), {})
    resolve(ex.request_body(json.dumps(body).encode()), {})
    return ex.handed_over


RESPONSES_GROUP = """
backends:
  - {name: ra, api: responses, models: ["r", "m"], endpoints: ["10.0.0.1:8000"]}
  - {name: rb, api: both, models: ["r"], endpoints: ["10.0.0.2:8000"]}
  - {name: ca, api: chat, models: ["c", "m"], endpoints: ["10.0.0.3:8000"]}
  - {name: mb, api: messages, models: ["c"], endpoints: ["10.0.0.4:8000"]}
"""


@pytest.mark.parametrize(("model", "path", "extra", "handed"), [
    ("r", "/v1/responses", {"background": True}, True),  # every member runs it itself
    ("c", "/v1/responses", {"background": True}, False),  # the sidecar runs it; its run's request is grouped
    ("m", "/v1/responses", {"background": True}, False),  # a chat member would need a run inside an attempt
    ("r", "/v1/responses/input_tokens", {}, True),  # every member counts
    ("m", "/v1/responses/input_tokens", {}, False),
    ("c", "/v1/responses/compact", {}, True),  # the sidecar compacts for every member: its items serve all
    ("m", "/v1/responses/compact", {}, False),  # a Responses member's item is its own
    ("r", "/v1/responses/compact", {}, False),
])
def test_which_calls_follow_the_group(model, path, extra, handed):
    gw = Gateway(parse_config(RESPONSES_GROUP), tenant_secret=b"s" * 32)
    assert _handed(gw, path, {"model": model, "input": "hi", **extra}) is handed


def test_an_attempt_whose_exchange_wants_nothing_of_the_answer_passes_it_as_it_came():
    """A token count reads nothing of its answer: held whole while another member is left, then as it is."""
    gw, store = Gateway(parse_config(RESPONSES_GROUP), tenant_secret=b"s" * 32), {}
    ex = Exchange(gw)
    count = {**CLIENT, ":path": "/v1/responses/input_tokens"}
    resolve(ex.request_headers(dict(count), False), store)
    act = resolve(ex.request_body(json.dumps({"model": "r", "input": "a b"}).encode()), store)
    a = GroupAttempt(gw, "10.0.0.1:8000")
    resolve(a.request_headers({**count, "x-gateway-failover": dict(act.set_headers)["x-gateway-failover"]}, False),
            store)
    resolve(a.request_body(json.dumps({"model": "r", "input": "a b"}).encode()), store)
    held = a.response_headers({":status": "200", "content-type": "application/json"})
    assert held.response_body_mode == BUFFERED and not held.done and not held.set_headers
    act = a.response_body(b'{"object": "response.input_tokens", "input_tokens": 2}', True)
    assert act.done and act.body is None and a.served is a.ex


def test_a_pass_through_success_is_held_whole_and_serves_only_once_its_body_is_whole():
    """A chat client on the keyed chat member: its exchange reads the answer as it passes (the key
    scrubbed). Held BUFFERED all the same, so its headers reach Envoy's router only with the body: a
    reset in between is a retry, and an attempt reset there has served nothing."""
    gw, store = gateway(), {}
    chat = {**CLIENT, ":path": "/v1/chat/completions"}
    body = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(chat), False), store)
    act = resolve(ex.request_body(json.dumps(body).encode()), store)
    headers = {**chat, "x-gateway-failover": dict(act.set_headers)["x-gateway-failover"]}
    reset = attempt(gw, store, headers, 1, "10.0.0.1:8000", body)
    held = reset.response_headers({":status": "200", "content-type": "application/json", "content-length": "512"})
    assert held.response_body_mode == BUFFERED and not held.done
    assert reset.attempts == [] and reset.served is None  # reset now: nobody served, the next attempt says so
    served = attempt(gw, store, headers, 1, "10.0.0.1:8000", body)
    served.response_headers({":status": "200", "content-type": "application/json"})
    answer = json.dumps({**COMPLETION, "model": "g"}).encode()
    out = served.response_body(answer, True)
    assert out.done and (out.body is None or out.body == answer)  # passed on untouched
    assert [(a.backend, a.outcome) for a in served.attempts] == [("keyed-chat", "ok")] and served.served is served.ex


THREE = """
failover: {max_attempts: 2, deadline_seconds: 10, attempt_timeout_seconds: 5}
backends:
  - {name: t-a, api: chat, models: ["t"], endpoints: ["10.0.2.1:8000"]}
  - {name: t-b, api: chat, models: ["t"], endpoints: ["10.0.2.2:8000"]}
  - {name: t-c, api: chat, models: ["t"], endpoints: ["10.0.2.3:8000"]}
"""
T_BODY = {"model": "t", "input": "hi"}
OVERLOADED = b'{"error": {"message": "overloaded"}}'


def _three() -> tuple[Gateway, dict[str, bytes], dict[str, str]]:
    """A group of three chat members, at most two attempts, a 10 s deadline: handed over (Responses client)."""
    gw, store = Gateway(parse_config(THREE), tenant_secret=b"s" * 32), {}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(T_BODY).encode()), store)
    assert dict(act.set_headers)["x-gateway-cluster"] == "group.t-a.t-b.t-c"
    return gw, store, {**CLIENT, "x-gateway-failover": dict(act.set_headers)["x-gateway-failover"]}


def _failed_over(gw: Gateway, store: dict[str, bytes], headers: dict[str, str], n: int, host: str) -> GroupAttempt:
    a = attempt(gw, store, headers, n, host, T_BODY)
    a.response_headers({":status": "503"})
    act = resolve(a.response_body(OVERLOADED, True), store)
    assert ("x-gateway-retry", "1") in act.set_headers  # Envoy retries on the next member
    return a


def test_max_attempts_ends_the_attempts_before_the_members_run_out():
    """Two attempts of three members: the second's failure is the client's one error (no retry mark),
    naming both; the third member is never run, even when Envoy tries it."""
    gw, store, headers = _three()
    _failed_over(gw, store, headers, 1, "10.0.2.1:8000")
    second = attempt(gw, store, headers, 2, "10.0.2.2:8000", T_BODY)
    assert second.last
    second.response_headers({":status": "429"})
    act = second.response_body(b'{"error": {"message": "Rate limit reached"}}', True)
    assert ("x-gateway-retry", "1") not in act.set_headers and act.done
    assert (":status", "502") in act.set_headers  # one 503 among them: not all rate-limited
    error = orjson.loads(act.body or b"{}")["error"]
    assert error["code"] == "all_backends_failed"
    assert error["message"] == ("every backend of model 't' failed (2 attempts): t-a: 503 overloaded; "
                                "t-b: 429 Rate limit reached")
    with pytest.raises(GatewayError, match="failed \\(2 attempts\\)"):
        attempt(gw, store, headers, 3, "10.0.2.3:8000", T_BODY)


def test_no_attempt_starts_after_the_deadline(monkeypatch):
    """`deadline_seconds` (10 s) after the hand-over, the next attempt is not run: it answers at once with
    the one error naming the attempts made; just before it, the next member is tried as usual."""
    gw, store, headers = _three()
    start = time.time()  # the hand-over's, within this test's first milliseconds
    _failed_over(gw, store, headers, 1, "10.0.2.1:8000")
    monkeypatch.setattr(time, "time", lambda: start + 9)
    in_time = attempt(gw, store, headers, 2, "10.0.2.2:8000", T_BODY)
    assert in_time.ex is not None and in_time.member is not None and in_time.member.name == "t-b"
    assert dict(in_time.body_act.set_headers)[":path"] == "/v1/chat/completions"  # sent on, translated
    monkeypatch.setattr(time, "time", lambda: start + 11)
    with pytest.raises(GatewayError) as e:
        attempt(gw, store, headers, 2, "10.0.2.2:8000", T_BODY)
    assert (e.value.status, e.value.code) == (502, "all_backends_failed")
    assert e.value.message == "every backend of model 't' failed (1 attempt): t-a: 503 overloaded"


def test_a_silent_member_running_into_the_deadline_is_a_504(monkeypatch):
    """The first member said nothing for the attempt timeout (5 s) and the second began after the
    deadline: the error names the first as timed out, so the client's answer is a 504."""
    gw, store, headers = _three()
    start = time.time()
    monkeypatch.setattr(time, "time", lambda: start + 10.5)
    with pytest.raises(GatewayError) as e:
        attempt(gw, store, headers, 2, "10.0.2.2:8000", T_BODY)
    assert (e.value.status, e.value.code) == (504, "all_backends_timed_out")
    assert e.value.message == "every backend of model 't' failed (1 attempt): t-a: timed out: no answer within 5 s"


def test_the_first_attempt_is_run_whenever_it_starts(monkeypatch):
    """The deadline bounds the attempts after the first: a first attempt that Envoy starts late (a slow
    hand-over) still runs, so the request is answered by its member, not refused unseen."""
    gw, store, headers = _three()
    start = time.time()
    monkeypatch.setattr(time, "time", lambda: start + 30)
    first = attempt(gw, store, headers, 1, "10.0.2.1:8000", T_BODY)
    assert first.member is not None and first.member.name == "t-a" and not first.last


def test_a_response_a_member_stored_is_continued_there_alone_even_when_it_is_out():
    """Only the backend that stored a response can continue it: the turn goes to its instance (no
    hand-over, no failover), whatever that member's health, never to a member that lacks the context."""
    gw, store = gateway(), {}
    tenant = gw.tenants.tenant_of(CLIENT)
    store.update(dict(response_pin(tenant, "resp_stored", rec.Pin("resp", "10.0.0.3:8000"))))
    for _ in range(10):
        gw.health.record("resp", False, gw.clock())  # ejected
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps({**BODY, "previous_response_id": "resp_stored"}).encode()), store)
    assert not ex.handed_over
    sets = dict(act.set_headers)
    assert sets["x-gateway-destination-endpoint"] == "10.0.0.3:8000" and "x-gateway-failover" not in sets


def _continue(gw: Gateway, pin: rec.Pin, store: dict[str, bytes] | None = None):
    """A Responses turn of model g continuing `resp_stored`, pinned as `pin`: the exchange, and its action."""
    store = {} if store is None else store
    store.update(dict(response_pin(gw.tenants.tenant_of(CLIENT), "resp_stored", pin)))
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    return ex, resolve(ex.request_body(json.dumps({**BODY, "previous_response_id": "resp_stored"}).encode()), store)


@pytest.mark.parametrize("first", ["keyed-chat", "resp"])  # which member the group would try first
@pytest.mark.parametrize(("pin", "where"), [
    (rec.Pin("resp", "10.0.0.9:8000"), "instance 10.0.0.9:8000 of backend 'resp'"),  # an instance taken out
    (rec.Pin("removed", "10.0.0.5:8000"), "instance 10.0.0.5:8000 of backend 'removed'"),  # a backend taken out
])
def test_a_stored_response_whose_instance_is_gone_is_a_409_whichever_member_comes_first(first, pin, where):
    """Nobody can continue it: the client is told so, the same way whatever the group's order (a chat
    member's attempt used to say that chat backend could not continue it: a 400 naming the wrong cause)."""
    gw = gateway()
    if first == "resp":
        gw.health.record("keyed-chat", False, gw.clock(), retry_after=30)
    with pytest.raises(GatewayError) as e:
        _continue(gw, pin)
    assert (e.value.status, e.value.code, e.value.param) == (409, "pinned_backend_gone", "previous_response_id")
    assert e.value.message == (f"Response 'resp_stored' is held by {where}, which is no longer configured; its "
                               "conversation cannot be continued")


def test_a_stored_response_of_a_backend_outside_the_group_takes_the_models_own_path():
    """A response another model's backend stored (`other`, not a member of g's group): not handed over to
    the group, whose attempts would have planned the turn for `other` (its headers, its key) and sent it
    to a member's instance; the model's own path decides, as off a group: g's primary is chat-only, which
    cannot continue a response a Responses backend holds, so a 400 naming both."""
    gw = gateway()
    gw.health.record("keyed-chat", False, gw.clock(), retry_after=30)  # the group would try resp first
    with pytest.raises(GatewayError) as e:
        _continue(gw, rec.Pin("other", "10.0.0.4:8000"))
    assert (e.value.status, e.value.code) == (400, "previous_response_not_found")
    assert "held by backend 'other'" in e.value.message and "chat-only backend 'keyed-chat'" in e.value.message


def test_a_stored_response_of_a_hosted_member_goes_to_that_member():
    """A `url:` member's pin names no instance (its addresses are its DNS's): the turn goes to it."""
    gw = Gateway(parse_config(CFG.replace("api: chat\n    models: [\"h\", \"solo-hosted\"]",
                                          "api: responses\n    models: [\"g\"]"), env={"POOL_KEY": "sk-pool"}),
                 tenant_secret=b"s" * 32)
    ex, act = _continue(gw, rec.Pin("hosted", None))
    assert not ex.handed_over and ex.req.member is not None and ex.req.member.backend.name == "hosted"
    assert dict(act.set_headers)["x-gateway-backend"] == "hosted"


def test_a_lost_record_is_a_502_not_a_guess():
    gw, store = gateway(), {}
    headers = hand_over(gw, store)
    store.pop(record_key(headers["x-gateway-failover"]))
    with pytest.raises(Exception, match="failover record is gone"):
        resolve(GroupAttempt(gw, "10.0.0.1:8000").request_headers(headers, False), store)


def test_the_group_cluster_has_the_members_as_priorities_and_the_route_retries_between_them():
    gw = gateway()
    compiled = compile_routes(gw.config, Knowledge(), {})
    # one cluster per first member: config order, then the other member first (a request held off the primary)
    assert [c.name for c in compiled.clusters if c.name.startswith("group.")] == \
        ["group.keyed-chat.resp", "group.resp.keyed-chat", "group.hosted.other", "group.other.hosted"]
    (cluster,) = [c for c in compiled.clusters if c.name == "group.keyed-chat.resp"]
    (fast,) = [c for c in compiled.clusters if c.name == "fast-group.keyed-chat.resp"]  # its twin without the processor
    assert not any(c.name.startswith("fast-stream-") for c in compiled.clusters)  # one twin, streams or not
    # the same members, then the sentinel that always takes the attempt after the last (NO_MEMBER_LISTENER)
    *members, sentinel = fast.load_assignment.endpoints
    assert members == list(cluster.load_assignment.endpoints)
    assert sentinel.priority == 2 and \
        [e.endpoint.address.envoy_internal_address.server_listener_name for e in sentinel.lb_endpoints] == \
        ["gateway.no-member"] * (sum(len(p.lb_endpoints) for p in members) + 1)
    # the attempt's processor, then the hold; the fast twin no attempt's processor (its filters:
    # tests/unit/test_failover_fast.py)
    assert [m.value for p in _processors(cluster) for m in p.grpc_service.initial_metadata] == ["failover", "hold"]
    assert _processors(fast) == []
    # not named as ext_proc is: a fast route's per-filter `disabled` for the client-side processor is
    # looked up by name by upstream filters too, and would turn the hold off
    assert group_routes.HOLD_FILTER in str(fast.typed_extension_protocol_options)
    assert [(p.priority, [e.endpoint.address.socket_address.port_value for e in p.lb_endpoints])
            for p in cluster.load_assignment.endpoints] == [(0, [8000]), (1, [8000, 8000])]
    assert cluster.outlier_detection.consecutive_5xx.value == gw.config.failover.eject_after
    routes = {r.name: r for r in compiled.routes.virtual_hosts[0].routes}
    retry = routes["processor:group.keyed-chat.resp"].route.retry_policy
    assert retry.retry_on == "retriable-headers,reset,connect-failure" and retry.num_retries.value == 2
    assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    # a silent member: reset after the attempt timeout (`reset` retries it), on the fast path too
    fast_retry = group_routes.fast_retry(gw.config, group_routes.member_lists(gw.config)[0])
    assert retry.per_try_timeout.seconds == fast_retry.per_try_timeout.seconds == 30
    # a grouped model never has a fast route to its primary alone; a model alone keeps its own
    def names(route) -> set[str]:
        out = set()
        for m in route.match.dynamic_metadata:
            v = m.value
            out |= {x.string_match.exact for x in v.or_match.value_matchers} | {v.string_match.exact}
        return out

    fast = [r for r in compiled.routes.virtual_hosts[0].routes if r.name.startswith("fast:")]
    assert not any("g" in names(r) for r in fast) and any("solo-hosted" in names(r) for r in fast)
    # a group with a `url:` member: the processor's attempts alone (they put on its Host and key), so no
    # fast route, no fast twin
    assert not any("h" in names(r) for r in fast)
    assert not any(c.name.startswith("fast-") and "hosted" in c.name for c in compiled.clusters)
    chat, resp, hosted, other = gw.config.backends
    assert group_routes.member_lists(gw.config) == [(chat, resp), (resp, chat), (hosted, other), (other, hosted)]


def _processors(cluster: Any) -> list[ext_proc_pb2.ExternalProcessor]:
    """A cluster's ext_proc upstream filters, in order (its codec last)."""
    options = hpo.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert not options.http_filters or [f.name for f in options.http_filters][-1] == "envoy.filters.http.upstream_codec"
    procs = []
    for f in options.http_filters:
        if f.typed_config.Is(ext_proc_pb2.ExternalProcessor.DESCRIPTOR):
            procs.append(ext_proc_pb2.ExternalProcessor())
            f.typed_config.Unpack(procs[-1])
    return procs


def test_a_group_cluster_holds_an_answers_headers_until_its_first_body_chunk():
    """Below the attempt's processor, a second one that Envoy sends the body without waiting for the
    headers' answer; the sidecar answers the headers of any answer with a body (a stream's, a JSON
    body's) only with its first chunk, then lets go."""
    gw = gateway()
    (cluster,) = [c for c in compile_routes(gw.config, Knowledge(), {}).clusters if c.name == "group.keyed-chat.resp"]
    attempt_proc, hold = _processors(cluster)  # the attempt's first: the hold sees the member's answer before it
    assert [m.value for m in attempt_proc.grpc_service.initial_metadata] == ["failover"]
    assert [m.value for m in hold.grpc_service.initial_metadata] == ["hold"]
    mode = processing_mode_pb2.ProcessingMode
    assert (hold.processing_mode.request_header_mode, hold.processing_mode.response_body_mode) == (mode.SKIP, mode.STREAMED)
    assert hold.send_body_without_waiting_for_header_response and hold.failure_mode_allow
    assert hold.message_timeout.seconds > gw.config.failover.attempt_timeout  # the per-try timeout ends a wait first

    for body_end in (False, True):  # the first of many chunks (a stream's), or the whole body (a small JSON one)
        h = Hold()
        assert h.message("response_headers", False) == [] and not h.done  # held
        assert h.message("response_body", body_end) == ["response_headers", "response_body"] and h.done
    h = Hold()  # no body at all: nothing to hold
    assert h.message("response_headers", True) == ["response_headers"] and h.done


def test_a_weighted_groups_fast_route_picks_each_members_order_by_weight():
    weighted = CHATS.replace('["10.0.1.1:8000"]\n', '["10.0.1.1:8000"]\n    weight: 2\n').replace(
        '["10.0.1.2:8000"]\n', '["10.0.1.2:8000"]\n    weight: 5\n')
    compiled = compile_routes(parse_config(weighted), Knowledge(), {})
    fast = [r.route for r in compiled.routes.virtual_hosts[0].routes if r.name == "fast:chat:group.chat-a.chat-b"]
    assert fast and all(not r.cluster and [(c.name, c.weight.value) for c in r.weighted_clusters.clusters] ==
                        [("fast-group.chat-a.chat-b", 2), ("fast-group.chat-b.chat-a", 5)] for r in fast)
    (b_first,) = [c for c in compiled.clusters if c.name == "fast-group.chat-b.chat-a"]
    assert [(p.priority, [e.endpoint.address.socket_address.port_value for e in p.lb_endpoints],
             p.lb_endpoints[0].endpoint.address.socket_address.address) for p in b_first.load_assignment.endpoints] == \
        [(0, [8000], "10.0.1.2"), (1, [8000], "10.0.1.1"), (2, [0, 0, 0], "")]  # (2: the sentinel's three hosts)
    unweighted = compile_routes(parse_config(CHATS), Knowledge(), {})
    assert {r.route.cluster for r in unweighted.routes.virtual_hosts[0].routes
            if r.name == "fast:chat:group.chat-a.chat-b"} == \
        {"fast-group.chat-a.chat-b"}  # config order alone; streams and the rest to the one twin


def test_a_pinned_continuation_reads_the_store_once_and_goes_to_its_member():
    gw, rounds = gateway(), []
    tenant = gw.tenants.tenant_of(CLIENT)
    store = {rec.pin_key(tenant, "resp_1"): rec.Pin("resp", "10.0.0.3:8000").dumps()}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    step = ex.request_body(json.dumps({**BODY, "previous_response_id": "resp_1"}).encode())
    while isinstance(step, Lookup):
        rounds.append(step.keys)
        step = step.then([store.get(k) for k in step.keys])
    assert not ex.handed_over and ("x-gateway-destination-endpoint", "10.0.0.3:8000") in step.set_headers
    assert len(rounds) == 1  # the pin that keeps it off the group's attempts also continues it: one read


def test_a_url_member_is_a_priority_resolved_by_dns_with_its_own_tls_and_its_name():
    gw = gateway()
    (cluster,) = [c for c in compile_routes(gw.config, Knowledge(), {}).clusters if c.name == "group.hosted.other"]
    assert cluster.type == cluster.STRICT_DNS  # the provider's name resolved, each address a host
    hosted_p, other_p = cluster.load_assignment.endpoints
    (host,) = hosted_p.lb_endpoints
    assert (hosted_p.priority, host.endpoint.address.socket_address.address,
            host.endpoint.address.socket_address.port_value) == (0, "api.example.com", 443)
    assert dict(host.metadata.filter_metadata["envoy.transport_socket_match"]) == {"member": "hosted"}
    assert [e.endpoint.address.socket_address.address for e in other_p.lb_endpoints] == ["10.0.0.4"]
    assert not other_p.lb_endpoints[0].metadata.filter_metadata  # plain TCP: the default transport socket
    (match,) = cluster.transport_socket_matches
    assert dict(match.match) == {"member": "hosted"} and not cluster.HasField("transport_socket")
    tls = str(match.transport_socket.typed_config.value)
    assert "api.example.com" in tls and "h2" not in tls  # its SNI and name check; HTTP/1.1, the group's codec


HOSTED_GROUP = """
failover: {max_attempts: 3}
backends:
  - name: pool
    api: chat
    models: ["g"]
    endpoints: ["10.0.0.1:8000"]
  - name: provider
    api: responses
    models: ["g"]
    url: https://api.provider.example/api
    api_key_env: PROVIDER_KEY
    headers: {X-Title: gw}
"""


def test_an_attempt_on_a_url_member_gets_its_host_path_and_key_and_the_next_attempt_none_of_them():
    gw, store = Gateway(parse_config(HOSTED_GROUP, env={"PROVIDER_KEY": "sk-provider"}), tenant_secret=b"s" * 32), {}
    ex = Exchange(gw)
    resolve(ex.request_headers(dict(CLIENT), False), store)
    act = resolve(ex.request_body(json.dumps(BODY).encode()), store)
    sets = dict(act.set_headers)
    assert ex.handed_over and sets["x-gateway-cluster"] == "group.pool.provider"
    headers = {**CLIENT, "x-gateway-failover": sets["x-gateway-failover"]}
    first = attempt(gw, store, headers, 1, "10.0.0.1:8000")
    first.response_headers({":status": "503"})
    resolve(first.response_body(b'{"error": {"message": "overloaded"}}', True), store)
    # the provider's host: an address of its DNS, named by the host's metadata
    second = attempt(gw, store, headers, 2, "203.0.113.9:443", named="provider")
    given = dict(second.body_act.set_headers)
    assert given[":authority"] == "api.provider.example" and given[":path"] == "/api/v1/responses"
    assert given["authorization"] == "Bearer sk-provider" and given["x-title"] == "gw"
    assert second.ex is not None and second.ex.target.endpoint is None  # the provider's, as off the group
    # a third attempt (on the pool again, were there one) starts from the client's headers
    changed = {**headers, **given, "x-envoy-attempt-count": "3"}
    assert dict(_restore(changed, CLIENT)) == {":authority": "gw", ":path": "/v1/responses",
                                               "authorization": "Bearer client-key"}


def _restore(current: dict[str, str], client: dict[str, str]) -> list[tuple[str, str]]:
    from extproc.exchange.failover import _restored

    sets, removes = _restored(current, client)
    assert "x-title" in removes
    return sets


@pytest.mark.parametrize(("sent", "member"), [
    # as Envoy 1.40 sent `xds.upstream_host_metadata` (measured): the message's text, "" or "NULL" without any
    ('filter_metadata { key: "envoy.transport_socket_match" value { fields { key: "member" value { string_value: '
     '"hosted" } } } } ', "hosted"),
    ("", ""), ("NULL", ""),
    ('filter_metadata { key: "other" value { fields { key: "member" value { string_value: "x" } } } } ', ""),
])
def test_the_attempts_member_is_read_from_its_hosts_metadata(sent, member):
    assert group_routes.named_member(sent) == member
