"""Compaction inside /v1/responses (`compaction_trigger`), sans-IO: the refusal, the compacted window,
the summary request and the Response (buffered and streamed), through the exchange."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import STREAMED, Action, Exchange
from extproc.routing.gateway import Gateway
from extproc.state import records as rec
from extproc.translate.compact import SUMMARY_INSTRUCTIONS, SUMMARY_REQUEST
from extproc.translate.compact_trigger import triggered, window
from extproc.translate.sse import SSEDecoder

from .exchanges import send
from .test_state_flow import CFG

TRIGGER = {"type": "compaction_trigger"}
SUMMARY_CHAT = {"id": "c", "created": 1, "model": "llama-3", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "THE SUMMARY"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}}


def user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": text}


def test_a_trigger_counts_only_as_the_last_item_and_is_refused_elsewhere():
    assert triggered({"input": [user("a"), TRIGGER]}) is True
    assert triggered({"input": [user("a")]}) is False and triggered({"input": "text"}) is False
    assert triggered({"input": []}) is False
    for inp, param in (([TRIGGER, user("a")], "input[0]"), ([user("a"), TRIGGER, TRIGGER], "input[1]")):
        with pytest.raises(GatewayError) as e:
            triggered({"input": inp})
        assert (e.value.status, e.value.param) == (400, param)
        assert e.value.message == "The 'compaction_trigger' item must be the final input item."


def test_the_window_keeps_user_messages_before_the_latest_compaction_item():
    assistant = {"type": "message", "role": "assistant", "content": "b"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    first, latest = {"type": "compaction", "encrypted_content": "1"}, {"type": "compaction", "encrypted_content": "2"}
    items = [user("a"), assistant, first, call, TRIGGER, user("c"), latest, user("d")]
    assert window(items) == [user("a"), user("c"), latest, user("d")]
    assert window([user("a"), assistant, TRIGGER]) == [user("a"), assistant]


@pytest.fixture
def gateway():
    return Gateway(parse_config(CFG, env={}))


def create(gateway, body: dict, store: dict[str, bytes] | None = None) -> tuple[Exchange, Action]:
    return send(gateway, "/v1/responses", body, store or {}, key="k1")


def test_a_chat_backend_gets_the_summary_request_and_the_client_one_sealed_item(gateway):
    body = {"model": "llama-3", "instructions": "you code", "store": False, "tools": [
        {"type": "function", "name": "sh", "parameters": {"type": "object"}}],
        "input": [user("fix the bug"), {"type": "message", "role": "assistant", "content": "done"}, TRIGGER]}
    ex, act = create(gateway, body)
    sent = json.loads(act.body)
    assert dict(act.set_headers)[":path"] == "/v1/chat/completions"
    assert sent == {"model": "llama-3", "messages": [
        {"role": "system", "content": SUMMARY_INSTRUCTIONS}, {"role": "system", "content": "you code"},
        {"role": "user", "content": "fix the bug"}, {"role": "assistant", "content": "done"},
        {"role": "user", "content": SUMMARY_REQUEST}]}
    ex.response_headers({":status": "200", "content-type": "application/json"})
    out = ex.response_body(json.dumps(SUMMARY_CHAT).encode(), True)
    doc = json.loads(out.body)
    assert doc["object"] == "response" and doc["status"] == "completed" and doc["store"] is False
    (item,) = doc["output"]
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    assert gateway.sealer.open(item["encrypted_content"], ex.req.pinning.tenant) == "THE SUMMARY"
    assert doc["usage"]["input_tokens"] == 30 and doc["usage"]["output_tokens"] == 4
    assert out.writes == []  # store: false


def test_streamed_the_answer_is_the_whole_lifecycle_and_a_stored_turn(gateway):
    ex, act = create(gateway, {"model": "llama-3", "stream": True, "input": [user("hello"), TRIGGER]})
    assert "stream" not in json.loads(act.body)  # one summary completion, replayed as the stream
    head = ex.response_headers({":status": "200", "content-type": "application/json"})
    assert head.response_body_mode != STREAMED
    out = ex.response_body(json.dumps(SUMMARY_CHAT).encode(), True)
    decoder = SSEDecoder()
    events = [json.loads(e.data) for e in decoder.feed(out.body) + decoder.close()]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2, 3, 4]
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["output"] == [events[3]["item"]]
    (key, raw), _ = out.writes
    record = json.loads(raw)
    assert key == f"turn:{ex.req.pinning.tenant}:{final['id']}" and record["response"]["output"] == final["output"]


def test_a_summary_without_text_fails_the_stream_with_its_terminal_event(gateway):
    ex, _ = create(gateway, {"model": "llama-3", "stream": True, "input": [user("hello"), TRIGGER]})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    empty = {**SUMMARY_CHAT, "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}
    out = ex.response_body(json.dumps(empty).encode(), True)
    decoder = SSEDecoder()
    kinds = [json.loads(e.data)["type"] for e in decoder.feed(out.body) + decoder.close()]
    assert kinds == ["response.created", "response.in_progress", "error", "response.failed"]


def test_a_continued_conversation_reaches_the_model_from_its_compacted_window(gateway):
    """Turn 1 held, turn 2 the compaction (held: its output is the sealed item), turn 3 continues: the
    chat model gets turn 1's user message, the summary, then the new message."""
    ex, _ = create(gateway, {"model": "llama-3", "input": [user("I am Zed")]})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    first = ex.response_body(json.dumps({**SUMMARY_CHAT, "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "hi Zed"}, "finish_reason": "stop"}]}).encode(), True)
    store = dict(first.writes)
    r1 = json.loads(first.body)["id"]
    ex, _ = create(gateway, {"model": "llama-3", "previous_response_id": r1, "input": [TRIGGER]}, store)
    ex.response_headers({":status": "200", "content-type": "application/json"})
    second = ex.response_body(json.dumps(SUMMARY_CHAT).encode(), True)
    store.update(second.writes)
    r2 = json.loads(second.body)["id"]
    _, act = create(gateway, {"model": "llama-3", "previous_response_id": r2, "input": "who am I?"}, store)
    sent = [(m["role"], m["content"]) for m in json.loads(act.body)["messages"]]
    assert sent == [("user", "I am Zed"), ("user", "Summary of the earlier conversation (compacted):\n\nTHE SUMMARY"),
                    ("user", "who am I?")]
    assert rec.load_turn(store[f"turn:{ex.req.pinning.tenant}:{r2}"])["ancestors"] == [r1]


def test_a_responses_backend_gets_the_trigger_untouched_and_a_misplaced_one_is_refused(gateway):
    body = {"model": "gpt-oss-1", "store": False, "input": [user("hello"), TRIGGER]}
    _, act = create(gateway, body)
    assert act.body is None and ":path" not in dict(act.set_headers)  # passed through as sent
    with pytest.raises(GatewayError) as e:
        create(gateway, {**body, "input": [TRIGGER, user("hello")]})
    assert (e.value.status, e.value.param) == (400, "input[0]")
    with pytest.raises(GatewayError):
        create(gateway, {**body, "model": "llama-3", "input": [TRIGGER, user("hello")]})

