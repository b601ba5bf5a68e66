"""Property tests of the Messages translators, in the style of test_fuzz: realistic answers, chunks and
requests, half the time broken at one place; translated to what Anthropic's clients accept, or refused
naming the field (a 502 `BadUpstream`, a stream's `error` event, a 400), never another exception or a
stream without its end."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import event, given
from hypothesis import strategies as st

from extproc.errors import GatewayError
from extproc.translate import (
    req_messages_to_chat,
    req_messages_to_responses,
    resp_chat_to_messages,
    resp_responses_to_messages,
)
from extproc.translate.stream_chat_to_messages import ChatToMessagesStream
from extproc.translate.stream_responses_to_messages import ResponsesToMessagesStream
from tests.messages_conformance import STOP_REASONS, check_messages_stream, messages_events
from tests.unit.test_fuzz import (
    CHAT_FIELDS,
    broken,
    broken_stream,
    chat_chunks,
    chat_completion,
    chat_turn,
    is_bad_upstream,
    name,
    pieces,
    response_events,
    response_object,
    sse,
    text,
    wire,
)

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def _json_turn(turn: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments as models write them: JSON objects (Anthropic's tool input is one)."""
    return {**turn, "calls": [(n, json.dumps({"q": a})) for n, a in turn["calls"]]}


def _check_message(out: dict[str, Any]) -> None:
    assert out["type"] == "message" and out["role"] == "assistant" and out["stop_reason"] in STOP_REASONS
    for block in out["content"]:
        assert block["type"] in ("text", "thinking", "tool_use"), block
        if block["type"] == "tool_use":
            assert isinstance(block["input"], dict) and block["id"] and isinstance(block["name"], str)
        if block["type"] == "thinking":
            assert block["signature"]
    assert all(isinstance(v, int) and v >= 0 for v in out["usage"].values())
    orjson.dumps(out)


@given(chat_turn().map(_json_turn).flatmap(lambda turn: st.tuples(st.just(turn), broken(chat_completion(turn)))))
def test_any_chat_answer_becomes_a_valid_message_or_a_502(case):
    turn, (doc, was_broken) = case
    try:
        out = resp_chat_to_messages.translate_response(wire(doc), "m", [])
    except GatewayError as e:
        assert was_broken and is_bad_upstream(e), e
        event("502 bad_upstream_response")
        return
    _check_message(out)
    if was_broken:
        return
    texts = "".join(b["text"] for b in out["content"] if b["type"] == "text")
    assert texts == (turn["text"] or "") + (turn["refusal"] or "")
    assert [(b["name"], json.dumps(b["input"])) for b in out["content"] if b["type"] == "tool_use"] == turn["calls"]
    assert any(b["type"] == "thinking" for b in out["content"]) == bool(turn["reasoning"])
    expected = "refusal" if turn["refusal"] and turn["finish"] == "stop" else _STOP[turn["finish"]]
    assert out["stop_reason"] == expected


@given(broken_stream(lambda turn: chat_chunks(_json_turn(turn))), st.booleans(),
       st.lists(st.integers(0, 10**6), max_size=4))
def test_any_chat_stream_becomes_a_valid_messages_stream(case, done, cuts):
    turn, chunks, was_broken = case
    t = ChatToMessagesStream("m", [])
    raw = b"".join(t.feed(p) for p in pieces(sse(chunks, done), cuts)) + t.close()
    msg = check_messages_stream(messages_events(raw))  # the grammar holds, and the stream has its end
    if was_broken:
        event("error" if msg["error"] else "translated, broken")
        return
    assert msg["error"] is None, msg["error"]
    turn = _json_turn(turn)
    texts = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
    assert texts == (turn["text"] or "") + (turn["refusal"] or "")
    assert [(b["name"], json.dumps(b["input"])) for b in msg["content"] if b["type"] == "tool_use"] == turn["calls"]


@given(chat_turn().map(_json_turn).flatmap(lambda turn: st.tuples(st.just(turn), broken(response_object(turn)))))
def test_any_responses_answer_becomes_a_valid_message_or_a_502(case):
    turn, (doc, was_broken) = case
    try:
        out = resp_responses_to_messages.translate_response(wire(doc), "m")
    except GatewayError as e:
        assert was_broken and is_bad_upstream(e), e
        return
    _check_message(out)
    if was_broken:
        return
    texts = "".join(b["text"] for b in out["content"] if b["type"] == "text")
    assert texts == (turn["text"] or "") + (turn["refusal"] or "")
    assert [(b["name"], json.dumps(b["input"])) for b in out["content"] if b["type"] == "tool_use"] == turn["calls"]
    status_stop = {"length": "max_tokens", "content_filter": "refusal"}.get(turn["finish"])
    assert out["stop_reason"] == status_stop or (status_stop is None and out["stop_reason"] in ("end_turn", "tool_use",
                                                                                               "refusal"))


@given(broken_stream(lambda turn: response_events(_json_turn(turn))), st.lists(st.integers(0, 10**6), max_size=4))
def test_any_responses_stream_becomes_a_valid_messages_stream(case, cuts):
    turn, events, was_broken = case
    t = ResponsesToMessagesStream("m")
    raw = b"".join(t.feed(p) for p in pieces(sse(events, False), cuts)) + t.close()
    msg = check_messages_stream(messages_events(raw))
    if was_broken:
        event("error" if msg["error"] else "translated, broken")
        return
    assert msg["error"] is None, msg["error"]
    turn = _json_turn(turn)
    texts = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
    assert texts == (turn["text"] or "") + (turn["refusal"] or "")
    assert [(b["name"], json.dumps(b["input"])) for b in msg["content"] if b["type"] == "tool_use"] == turn["calls"]


# -- client requests ----------------------------------------------------------------------------------

tool = st.fixed_dictionaries({"name": name, "description": text,
                              "input_schema": st.just({"type": "object", "properties": {"q": {"type": "string"}}})})


@st.composite
def messages_request(draw: st.DrawFn) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": draw(text | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=2))}]
    for i in range(draw(st.integers(0, 3))):
        uses = [{"type": "tool_use", "id": f"toolu_{i}_{j}", "name": "f", "input": {"q": draw(text)}}
                for j in range(draw(st.integers(0, 2)))]
        thinking = [{"type": "thinking", "thinking": draw(text), "signature": draw(name)}] if draw(st.booleans()) else []
        messages.append({"role": "assistant", "content": [*thinking, {"type": "text", "text": draw(text)}, *uses]})
        results = [{"type": "tool_result", "tool_use_id": u["id"], "content": draw(text), "is_error": draw(st.booleans())}
                   for u in uses]
        messages.append({"role": "user", "content": [*results, {"type": "text", "text": draw(text)}]})
    body: dict[str, Any] = {"model": "m", "max_tokens": draw(st.integers(1, 10**6)), "messages": messages,
                            "tools": [{"name": "f", "input_schema": {"type": "object"}}]}
    optional = {"system": text, "temperature": st.floats(0, 1), "top_p": st.floats(0, 1), "top_k": st.integers(1, 50),
                "stream": st.booleans(), "stop_sequences": st.lists(text, max_size=2),
                "metadata": st.fixed_dictionaries({"user_id": name}),
                "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                                {"type": "tool", "name": "f", "disable_parallel_tool_use": True}]),
                "thinking": st.builds(lambda b: {"type": "enabled", "budget_tokens": b}, st.integers(1024, 64000))}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@given(messages_request().flatmap(broken))
def test_a_messages_request_broken_anywhere_is_translated_for_responses_or_refused(case):
    body, was_broken = case
    try:
        out, dropped = req_messages_to_responses.translate_request(body)
    except GatewayError as e:
        assert was_broken, e.message
        assert e.status == 400 and e.param, e.message
        return
    except KeyError as e:
        assert was_broken and e.args == ("model",)
        return
    calls: set[str] = set()
    for item in out["input"]:  # every tool output answers a call made before it
        calls |= {item["call_id"]} if item["type"] == "function_call" else set()
        assert item["type"] != "function_call_output" or item["call_id"] in calls
    assert set(dropped) <= {"top_k", "stop_sequences"} and out["store"] is False
    orjson.dumps(out)


@given(messages_request().flatmap(broken))
def test_a_messages_request_broken_anywhere_is_translated_or_refused_naming_the_field(case):
    body, was_broken = case
    try:
        out, dropped = req_messages_to_chat.translate_request(body)
    except GatewayError as e:
        event(f"refused: {e.code}")
        assert was_broken, e.message  # a valid request is never refused
        assert e.status == 400 and e.param, e.message
        return
    except KeyError as e:  # `model` itself removed: the request side refuses it before any translator runs
        assert was_broken and e.args == ("model",)
        return
    assert set(out) <= CHAT_FIELDS
    assert set(dropped) <= {"top_k"}
    calls: set[str] = set()
    for m in out["messages"]:  # every tool message answers a call made before it
        calls |= {c["id"] for c in m.get("tool_calls") or ()}
        assert m["role"] != "tool" or m["tool_call_id"] in calls
    orjson.dumps(out)
