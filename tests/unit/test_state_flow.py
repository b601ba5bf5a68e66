"""previous_response_id and /v1/responses/{id} in the exchange state machine, with a dict as the store."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import STREAMED, Exchange, Lookup
from extproc.routing.gateway import Gateway
from extproc.state import records as conv

from .exchanges import answered, endpoint, send
from .ring_reference import owner

CFG = """
usage_accounting: translated  # so that pinning alone decides which phases are asked for
backends:
  - name: resp
    api: responses
    models: ["gpt-oss-*"]
    endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    authenticates_callers: true  # so that an id with no record is placed by the ring
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["10.0.1.1:80", "10.0.1.2:80"]
"""


# Where the ring of backend `resp` puts ids that have no record: derived with the reference model of
# the ring (tests/unit/ring_reference.py, checked against the published FNV-1a and splitmix64 vectors).
RING_HOME = {"resp_old": "10.0.0.1:80", "r8": "10.0.0.3:80"}


def test_ring_homes_are_the_reference_placements():
    assert {rid: owner(rid, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]) for rid in RING_HOME} == RING_HOME


@pytest.fixture
def gateway():
    return Gateway(parse_config(CFG, env={}))


def test_reply_id_is_pinned_from_the_first_chunk_only(gateway):
    ex, act = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi", "stream": True}, {})
    assert not act.done  # the reply's id is needed
    assert ex.response_headers({":status": "200", "content-type": "text/event-stream"}).response_body_mode == STREAMED
    assert ex.response_body(b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"res', False).writes == []
    act = ex.response_body(b'ponse":{"id":"resp_abc","object":"response"}}\n\n', False)
    assert act.done and act.body is None
    assert act.writes == [("pin:anonymous:resp_abc", conv.Pin("resp", endpoint_of(ex)).dumps()),
                          ("owner:resp_abc", b"anonymous")]


def test_a_body_is_pinned_under_its_own_id_not_a_nested_one_listed_first(gateway):
    """An output item's `id` may come before the Response's own: the pin is under the top-level id."""
    ex, _ = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi"}, {})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    body = (b'{"output":[{"id":"msg_1","type":"message","content":[]}],'
            b'"id":"resp_top","object":"response","status":"completed"}')
    assert ex.response_body(body[:30], False).writes == []
    act = ex.response_body(body[30:], True)
    assert act.writes == [("pin:anonymous:resp_top", conv.Pin("resp", endpoint_of(ex)).dumps()),
                          ("owner:resp_top", b"anonymous")]


def test_a_stream_is_pinned_under_the_id_of_its_response_created_event(gateway):
    ex, _ = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi", "stream": True}, {})
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    act = ex.response_body(b'data: {"type":"response.created","sequence_number":0,"response":'
                           b'{"output":[{"id":"msg_1"}],"id":"resp_s","object":"response"}}\n\n', False)
    assert act.done and act.writes[0] == ("pin:anonymous:resp_s", conv.Pin("resp", endpoint_of(ex)).dumps())


def test_a_stream_without_response_created_in_its_first_64_kib_is_not_pinned(gateway):
    ex, _ = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi", "stream": True}, {})
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    filler = b'data: {"type":"response.in_progress","id":"resp_x"}\n\n' * 1400  # over 64 KiB
    act = ex.response_body(filler, False)
    assert act.done and act.writes == []


def endpoint_of(ex: Exchange) -> str:
    assert ex.target is not None and ex.target.endpoint is not None
    return ex.target.endpoint


def test_no_pin_for_store_false_or_errors(gateway):
    _, act = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi", "store": False}, {})
    assert act.done
    ex, act = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "hi"}, {})
    assert ex.response_headers({":status": "429", "content-type": "application/json"}).done


def test_previous_response_id_follows_the_pin(gateway):
    store = {"pin:anonymous:resp_1": conv.Pin("resp", "10.0.0.3:80").dumps()}
    for _ in range(5):
        ex, act = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "x", "previous_response_id": "resp_1",
                                                  "prompt_cache_key": "anything"}, store)
        assert endpoint(act) == "10.0.0.3:80" and act.body is None and ex.pin_decision == "pin_hit"


def test_without_a_record_the_ring_position_of_the_id_decides(gateway):
    body = {"model": "gpt-oss-1", "input": "x", "previous_response_id": "resp_old"}
    sent = [send(gateway, "/v1/responses", body, store) for store in ({}, None) for _ in range(5)]  # None: store down
    assert {endpoint(act) for _, act in sent} == {RING_HOME["resp_old"]}
    assert {ex.pin_decision for ex, _ in sent} == {"pin_fallback"}


def test_pin_to_a_removed_endpoint_is_a_clear_409(gateway):
    store = {"pin:anonymous:resp_1": conv.Pin("resp", "10.0.0.9:80").dumps()}
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "x", "previous_response_id": "resp_1"}, store)
    assert e.value.status == 409 and "10.0.0.9:80" in e.value.message and e.value.code == "pinned_backend_gone"


def turn(rid: str, text: str, answer: str, ancestors: list[str], endpoint: str = "10.0.1.2:80") -> bytes:
    response = {"id": rid, "status": "completed", "output": [
        {"type": "message", "id": "m" + rid, "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": answer, "annotations": []}]}]}
    return conv.turn_record(response, conv.input_items(text), ancestors, endpoint)


def test_chat_backend_rebuilds_the_chain_in_two_lookups(gateway):
    store = {"turn:anonymous:r1": turn("r1", "my name is Zed", "hi Zed", []),
             "turn:anonymous:r2": turn("r2", "and you?", "a bot", ["r1"])}
    ex = Exchange(gateway)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    step = ex.request_body(json.dumps({"model": "llama-3", "input": "who am I?", "previous_response_id": "r2",
                                       "instructions": "be brief"}).encode())
    assert isinstance(step, Lookup) and step.keys == ("turn:anonymous:r2", "pin:anonymous:r2", "owner:r2")
    step = step.then([store.get(k) for k in step.keys])
    assert isinstance(step, Lookup) and step.keys == ("turn:anonymous:r1",)  # all ancestors at once
    act = answered(step, store)
    sent = json.loads(act.body)["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "be brief"), ("user", "my name is Zed"), ("assistant", "hi Zed"), ("user", "and you?"),
        ("assistant", "a bot"), ("user", "who am I?")]
    assert endpoint(act) == "10.0.1.2:80"  # the instance that served the conversation, for its cache
    ex.response_headers({":status": "200", "content-type": "application/json"})
    out = ex.response_body(json.dumps({"id": "c", "created": 1, "model": "llama-3", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Zed"}, "finish_reason": "stop"}]}).encode(), True)
    doc = json.loads(out.body)
    assert doc["previous_response_id"] == "r2"
    ((key, raw), owner) = out.writes
    record = json.loads(raw)
    assert key == "turn:anonymous:" + doc["id"] and record["ancestors"] == ["r1", "r2"]
    assert owner == ("owner:" + doc["id"], b"anonymous")
    assert record["input"][0]["content"] == [{"type": "input_text", "text": "who am I?"}]


@pytest.mark.parametrize(("store", "status", "code"), [
    ({}, 404, "previous_response_not_found"),
    ({"turn:anonymous:r2": turn("r2", "a", "b", ["r1"])}, 404, "previous_response_not_found"),  # r1 expired
    ({"pin:anonymous:r2": conv.Pin("resp", "10.0.0.1:80").dumps()}, 400, "previous_response_not_found"),
    (None, 503, "state_unavailable"),
])
def test_chat_backend_without_the_conversation(gateway, store, status, code):
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/responses", {"model": "llama-3", "input": "x", "previous_response_id": "r2"}, store)
    assert (e.value.status, e.value.code) == (status, code)


def test_held_conversation_moves_to_a_responses_backend_whole(gateway):
    store = {"turn:anonymous:r1": turn("r1", "hello", "hi", [])}
    _, act = send(gateway, "/v1/responses", {"model": "gpt-oss-1", "input": "next", "previous_response_id": "r1"}, store)
    sent = json.loads(act.body)
    assert "previous_response_id" not in sent
    assert [i["type"] for i in sent["input"]] == ["message", "message", "message"]


def test_store_false_turn_is_not_kept(gateway):
    ex, _ = send(gateway, "/v1/responses", {"model": "llama-3", "input": "x", "store": False}, {})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    out = ex.response_body(json.dumps({"id": "c", "created": 1, "model": "llama-3", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y"}, "finish_reason": "stop"}]}).encode(), True)
    assert out.writes == []


def test_resources_answered_from_held_turns(gateway):
    store = {"turn:anonymous:r1": turn("r1", "hello", "hi", [])}
    _, act = send(gateway, "/v1/responses/r1", None, store, method="GET")
    assert act.immediate[0] == 200 and json.loads(act.immediate[1])["id"] == "r1"
    _, act = send(gateway, "/v1/responses/r1/input_items?order=asc", None, store, method="GET")
    page = json.loads(act.immediate[1])
    assert page["object"] == "list" and page["data"][0]["content"][0]["text"] == "hello" and not page["has_more"]
    _, act = send(gateway, "/v1/responses/r1", None, store, method="DELETE")
    assert json.loads(act.immediate[1]) == {"id": "r1", "object": "response", "deleted": True}
    assert act.writes == [("turn:anonymous:r1", None)]
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/responses/r1/cancel", None, store)
    assert e.value.status == 400
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/responses/r1", None, store, method="PUT")
    assert e.value.status == 405


def test_resources_follow_pins_else_the_ring(gateway):
    store = {"pin:anonymous:r9": conv.Pin("resp", "10.0.0.2:80").dumps()}
    for path in ("/v1/responses/r9", "/v1/responses/r9/input_items"):
        ex, act = send(gateway, path, None, store, method="GET")
        assert endpoint(act) == "10.0.0.2:80" and not act.done  # a 503 from a dead instance gets explained
        assert ex.response_headers({":status": "200", "content-type": "application/json"}).done
    _, act = send(gateway, "/v1/responses/r8", None, store, method="DELETE")
    assert endpoint(act) == RING_HOME["r8"] and act.done


def test_dead_pinned_instance_is_explained(gateway):
    store = {"pin:anonymous:r9": conv.Pin("resp", "10.0.0.2:80").dumps()}
    ex, _ = send(gateway, "/v1/responses/r9", None, store, method="GET")
    act = ex.response_headers({":status": "503", "content-type": "text/plain"})
    assert not act.done
    out = ex.response_body(b"upstream connect error or disconnect/reset before headers", True)
    err = json.loads(out.body)["error"]
    assert err["code"] == "pinned_backend_unavailable" and "10.0.0.2:80" in err["message"]


def test_cluster_backends_are_pinned_too():
    """Two Responses-capable backends: GET /v1/responses/{id} must reach the one that made it."""
    gw = Gateway(parse_config("""
usage_accounting: translated
backends:
  - {name: vllm, api: both, models: ["llama-*"], endpoints: ["10.0.0.1:80"]}
  - {name: openai, api: both, models: ["gpt-*"], cluster: openai}
""", env={}))
    ex, act = send(gw, "/v1/responses", {"model": "gpt-5", "input": "hi"}, {})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    out = ex.response_body(b'{"id": "resp_oa", "object": "response"}', True)
    assert out.writes == [("pin:anonymous:resp_oa", conv.Pin("openai", None).dumps()), ("owner:resp_oa", b"anonymous")]
    _, act = send(gw, "/v1/responses/resp_oa", None, dict(out.writes), method="GET")
    assert dict(act.set_headers)["x-gateway-cluster"] == "openai"
