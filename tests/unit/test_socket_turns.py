"""WebSocket mode's sans-IO half: client messages to request bodies, the socket's memory, error events."""

from __future__ import annotations

import json

import pytest

from extproc.errors import GatewayError
from extproc.front.socket_turns import SocketSession, error_event, upstream_error_event


def completed(rid: str, text: str) -> str:
    return json.dumps({"type": "response.completed", "sequence_number": 9, "response": {
        "id": rid, "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": text, "annotations": []}]}]}})


def test_a_create_message_becomes_a_streaming_request_body():
    body = json.loads(SocketSession().request(json.dumps({"type": "response.create", "model": "m", "input": "hi"})))
    assert body == {"model": "m", "input": "hi", "stream": True}


def test_stream_true_is_tolerated_as_codex_sends_it():
    """Codex CLI's WebSocket mode sends `stream: true`; a socket's turns stream anyway."""
    sent = json.dumps({"type": "response.create", "model": "m", "input": "hi", "stream": True})
    assert json.loads(SocketSession().request(sent)) == {"model": "m", "input": "hi", "stream": True}


@pytest.mark.parametrize(("message", "code", "param"), [
    ("{", "invalid_json", None),
    (json.dumps({"type": "response.cancel"}), "unsupported_event", "type"),
    (json.dumps(["response.create"]), "unsupported_event", "type"),
    (json.dumps({"type": "response.create", "model": "m", "stream": False}), "unsupported_parameter", "stream"),
    (json.dumps({"type": "response.create", "model": "m", "background": False}), "unsupported_parameter", "background"),
    (json.dumps({"type": "response.create", "model": "m", "previous_response_id": 3}), "invalid_value",
     "previous_response_id"),
])
def test_invalid_messages_are_refused(message, code, param):
    with pytest.raises(GatewayError) as e:
        SocketSession().request(message)
    assert (e.value.status, e.value.code, e.value.param) == (400, code, param)


def test_an_unstored_turn_is_continued_from_the_sockets_memory_without_item_ids():
    s = SocketSession()
    s.request(json.dumps({"type": "response.create", "model": "m", "input": "one", "store": False}))
    assert s.event(completed("resp_1", "uno")) is True
    body = json.loads(s.request(json.dumps({"type": "response.create", "model": "m", "store": False,
                                            "previous_response_id": "resp_1", "input": "two"})))
    assert "previous_response_id" not in body
    assert json.loads(s.relayed(completed("resp_2", "dos")))["response"]["previous_response_id"] == "resp_1"
    assert body["input"] == [{"role": "user", "content": "one"},
                             {"type": "message", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_text", "text": "uno", "annotations": []}]},
                             {"role": "user", "content": "two"}]


def test_a_stored_turn_or_an_older_id_is_left_to_the_gateway():
    s = SocketSession()
    s.request(json.dumps({"type": "response.create", "model": "m", "input": "one"}))
    s.event(completed("resp_1", "uno"))
    body = json.loads(s.request(json.dumps({"type": "response.create", "model": "m", "previous_response_id": "resp_1"})))
    assert body["previous_response_id"] == "resp_1"
    s.request(json.dumps({"type": "response.create", "model": "m", "input": "x", "store": False}))
    s.event(completed("resp_2", "dos"))
    body = json.loads(s.request(json.dumps({"type": "response.create", "model": "m", "previous_response_id": "resp_1"})))
    assert body["previous_response_id"] == "resp_1"  # only the latest response is remembered


def test_only_terminal_events_end_a_turn():
    s = SocketSession()
    assert s.event(json.dumps({"type": "response.output_text.delta", "delta": "x"})) is False
    assert s.event("not json") is False
    assert s.event(json.dumps({"type": "response.failed", "response": {"id": "resp_f"}})) is True
    assert s.latest_id is None


def test_error_events_carry_status_and_a_string_code():
    assert json.loads(error_event(404, {"message": "gone", "type": "invalid_request_error", "code": None})) == {
        "type": "error", "status": 404, "error": {"message": "gone", "type": "invalid_request_error",
                                                  "code": "invalid_request_error"}}
    ev = json.loads(upstream_error_event(503, b"upstream connect error"))
    assert ev["status"] == 503 and ev["error"]["message"] and isinstance(ev["error"]["code"], str)


def create(**fields) -> str:
    return json.dumps({"type": "response.create", "model": "m", **fields})


def test_a_failed_continuation_evicts_the_unstored_response_it_continued():
    """Open Responses, WebSocket continuation: a turn continuing from a cached response fails, so that
    response leaves the cache; being unstored, continuing it again is previous_response_not_found."""
    s = SocketSession()
    s.request(create(input="one", store=False))
    s.event(completed("resp_1", "uno"))
    s.request(create(input="two", store=False, previous_response_id="resp_1"))
    s.failed()  # e.g. the upstream answered 500
    with pytest.raises(GatewayError) as e:
        s.request(create(input="two again", store=False, previous_response_id="resp_1"))
    assert (e.value.status, e.value.code, e.value.param) == (400, "previous_response_not_found", "previous_response_id")


def test_a_failed_stream_evicts_too_and_a_stored_response_is_left_to_the_gateway():
    s = SocketSession()
    s.request(create(input="one", store=False))
    s.event(completed("resp_1", "uno"))
    s.request(create(input="two", store=False, previous_response_id="resp_1"))
    assert s.event(json.dumps({"type": "response.failed", "response": {"id": "resp_2"}})) is True
    with pytest.raises(GatewayError):
        s.request(create(input="x", store=False, previous_response_id="resp_1"))
    s.request(create(input="stored"))
    s.event(completed("resp_3", "tres"))
    s.request(create(input="four", previous_response_id="resp_3"))
    s.failed()  # resp_3 is stored: the gateway may still continue it from its own state
    assert json.loads(s.request(create(input="four", previous_response_id="resp_3")))["previous_response_id"] == "resp_3"


def test_an_older_unstored_response_is_not_found_and_a_newer_one_continues():
    s = SocketSession()
    s.request(create(input="one", store=False))
    s.event(completed("resp_1", "uno"))
    s.request(create(input="two", store=False))
    s.event(completed("resp_2", "dos"))
    with pytest.raises(GatewayError) as e:  # only the latest is cached, and an unstored one has no fallback
        s.request(create(input="x", store=False, previous_response_id="resp_1"))
    assert e.value.code == "previous_response_not_found"
    body = json.loads(s.request(create(input="three", store=False, previous_response_id="resp_2")))
    assert [i["content"] for i in body["input"] if i.get("role") == "user"] == ["two", "three"]


def test_a_refused_message_leaves_the_cache_alone_unless_it_continued_it():
    """Open Responses: a continuation turn that fails with a 4xx evicts what it continued, the socket's
    own refusal included; any other refused message is no turn at all."""
    s = SocketSession()
    s.request(create(input="one", store=False))
    s.event(completed("resp_1", "uno"))
    for refused in (create(input="x", stream=False), '{"type": "response.cancel"}', "{"):
        with pytest.raises(GatewayError):
            s.request(refused)
    assert "previous_response_id" not in json.loads(s.request(create(input="two", store=False,
                                                                     previous_response_id="resp_1")))
    s.event(completed("resp_2", "dos"))
    with pytest.raises(GatewayError):
        s.request(create(input="x", stream=False, previous_response_id="resp_2"))
    with pytest.raises(GatewayError) as e:
        s.request(create(input="three", store=False, previous_response_id="resp_2"))
    assert e.value.code == "previous_response_not_found"


def test_a_compaction_turn_is_remembered_as_its_compacted_window():
    s = SocketSession()
    s.request(create(input=[{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                            {"type": "compaction_trigger"}], store=False))
    item = {"type": "compaction", "id": "cmp_1", "encrypted_content": "xpc1.abc"}
    s.event(json.dumps({"type": "response.completed", "response": {"id": "resp_1", "output": [item]}}))
    body = json.loads(s.request(create(input="two", store=False, previous_response_id="resp_1")))
    assert body["input"] == [{"role": "user", "content": "one"}, {"type": "compaction", "encrypted_content": "xpc1.abc"},
                             {"role": "user", "content": "two"}]


def test_the_connection_limit_is_an_error_with_its_code():
    now = [0.0]
    s = SocketSession(clock=lambda: now[0], limit_seconds=3600)
    s.request(create(input="one"))
    now[0] = 3599.5
    assert s.remaining() == 0.5
    now[0] = 3600.0
    with pytest.raises(GatewayError) as e:
        s.request(create(input="two"))
    assert e.value.code == "websocket_connection_limit_reached"
