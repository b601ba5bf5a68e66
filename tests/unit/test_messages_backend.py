"""Chat and Responses clients on a Messages backend: the chat request as Messages, the Message and its
stream as chat (sans-IO), with expected values written out here; and property tests in the style of
test_fuzz (realistic Messages answers and event streams broken at one place)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import parse_config
from extproc.errors import BadUpstream, GatewayError
from extproc.translate import req_chat_to_messages, resp_messages_to_chat, responses_on_messages
from extproc.translate.pairs import ResponsesOnMessages
from extproc.translate.sse import SSEDecoder, encode
from extproc.translate.stream_messages_to_chat import MessagesToChatStream
from tests.unit.test_fuzz import CHAT_COMPLETION, broken, chat_turn, check, is_bad_upstream, pieces, wire

_MESSAGES_BACKEND = "backends: [{name: c, api: messages, models: ['*'], endpoints: ['127.0.0.1:9']}]"
WEATHER = {"type": "function", "function": {"name": "w", "description": "Weather", "parameters": {"type": "object"}}}


def test_a_chat_request_maps_field_by_field():
    body = {"model": "claude-x", "max_completion_tokens": 100, "temperature": 0.1, "top_p": 0.5, "stop": "END",
            "user": "u", "reasoning_effort": "medium", "stream": True, "stream_options": {"include_usage": True},
            "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "w"}},
            "parallel_tool_calls": False, "metadata": {"k": "v"}, "store": False,
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
            "messages": [
                {"role": "system", "content": "Sys."}, {"role": "developer", "content": [{"type": "text", "text": "Dev."}]},
                {"role": "user", "content": [{"type": "text", "text": "Look"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                                             {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "dropped",
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}},
                                {"id": "c2", "type": "function", "function": {"name": "w", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]},
                {"role": "user", "content": "thanks"}]}
    assert req_chat_to_messages.translate_request(body) == {
        # no thinking: Anthropic refuses it with a forced tool choice (test_thinking_only_where_anthropic_takes_it)
        "model": "claude-x", "max_tokens": 100, "system": "Sys.\n\nDev.", "temperature": 0.1, "top_p": 0.5,
        "stop_sequences": ["END"], "metadata": {"user_id": "u"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}, "stream": True,
        "tools": [{"name": "w", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "w", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AAA"}},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "c1", "name": "w", "input": {"a": 1}},
                                              {"type": "tool_use", "id": "c2", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r1"},
                                         {"type": "tool_result", "tool_use_id": "c2", "content": "r2"},
                                         {"type": "text", "text": "thanks"}]}]}


def test_max_tokens_has_a_default_and_choices_map():
    out = req_chat_to_messages.translate_request({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                  "tools": [WEATHER], "tool_choice": "required"})
    assert out["max_tokens"] == req_chat_to_messages.DEFAULT_MAX_TOKENS and out["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"seed": 3}, "seed"), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"foo": 1}, "foo"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": True}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
])
def test_what_cannot_be_mapped_is_refused_naming_the_field(extra, param):
    with pytest.raises(GatewayError) as e:
        req_chat_to_messages.translate_request({"model": "m", "messages": [{"role": "user", "content": "q"}], **extra})
    assert e.value.status == 400 and e.value.param == param


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
           "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"}, {"type": "text", "text": "Hi"},
                       {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"a": 1}}],
           "usage": {"input_tokens": 5, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "output_tokens": 4}}
CHAT_USAGE = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 3},
              "completion_tokens_details": {"reasoning_tokens": 0}}


def test_a_message_becomes_a_chat_completion():
    out = resp_messages_to_chat.translate_response(MESSAGE, "asked")
    check(CHAT_COMPLETION, out)
    assert out["id"] == "chatcmpl-1" and out["model"] == "claude-x" and out["usage"] == CHAT_USAGE
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "refusal": None, "reasoning_content": "hm",
                                            "tool_calls": [{"id": "toolu_1", "type": "function",
                                                            "function": {"name": "w", "arguments": '{"a":1}'}}]}


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                                              ("refusal", "content_filter"), ("pause_turn", "stop")])
def test_stop_reasons(stop, finish):
    doc = {**MESSAGE, "content": [{"type": "text", "text": "x"}], "stop_reason": stop}
    assert resp_messages_to_chat.translate_response(doc, "m")["choices"][0]["finish_reason"] == finish


def events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A Message as Anthropic streams it."""
    evs: list[dict[str, Any]] = [{"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                                      "usage": {**message["usage"], "output_tokens": 1}}},
                                 {"type": "ping"}]
    for i, b in enumerate(message["content"]):
        if b["type"] == "tool_use":
            evs.append({"type": "content_block_start", "index": i, "content_block": {**b, "input": {}}})
            text = json.dumps(b["input"])
            evs += [{"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": p}}
                    for p in (text[:3], text[3:])]
        else:
            key = b["type"]
            evs.append({"type": "content_block_start", "index": i, "content_block": {**b, key: ""}})
            evs.append({"type": "content_block_delta", "index": i, "delta": {"type": f"{key}_delta", key: b[key]}})
            if key == "thinking":
                evs.append({"type": "content_block_delta", "index": i,
                            "delta": {"type": "signature_delta", "signature": b["signature"]}})
        evs.append({"type": "content_block_stop", "index": i})
    evs += [{"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
             "usage": {"output_tokens": message["usage"]["output_tokens"]}}, {"type": "message_stop"}]
    return evs


def sse(evs: list[Any]) -> bytes:
    return b"".join(encode(json.dumps(e).encode(), e.get("type") if isinstance(e, dict) and
                           isinstance(e.get("type"), str) else None) for e in evs)


def chunks_of(raw: bytes) -> list[Any]:
    dec = SSEDecoder()
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in dec.feed(raw) + dec.close()]


def test_a_messages_stream_becomes_chat_chunks():
    t = MessagesToChatStream({"stream_options": {"include_usage": True}}, "asked")
    out = chunks_of(t.feed(sse(events(MESSAGE))) + t.close())
    assert out[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in out[:-1] if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "hm"
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": ""}}
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"a": 1}'
    assert out[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-2]["usage"] == {**CHAT_USAGE, "completion_tokens": 4, "total_tokens": 14}
    assert t.response is not None and t.response["usage"]["prompt_tokens"] == 10


def test_an_error_event_is_a_chat_error_chunk():
    t = MessagesToChatStream({}, "m")
    out = chunks_of(t.feed(sse([*events(MESSAGE)[:3], {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}])))
    assert out[-2] == {"error": {"message": "Overloaded", "type": "server_error", "param": None,
                                 "code": "overloaded_error"}} and out[-1] == "[DONE]"


def test_a_buffered_message_with_a_bad_block_is_a_502():
    with pytest.raises(BadUpstream) as e:
        resp_messages_to_chat.translate_response({**MESSAGE, "content": [{"type": "tool_use", "name": "w"}]}, "m")
    assert e.value.field == "content[0].id"


def _message(turn: dict[str, Any]) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if turn["reasoning"]:
        content.append({"type": "thinking", "thinking": turn["reasoning"], "signature": "sig"})
    if turn["text"]:
        content.append({"type": "text", "text": turn["text"]})
    content += [{"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": {"q": a}} for i, (n, a) in enumerate(turn["calls"])]
    u = turn["usage"] or (0, 0, 0, 0)
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": content,
            "stop_reason": "tool_use" if turn["calls"] else {"length": "max_tokens"}.get(turn["finish"], "end_turn"),
            "stop_sequence": None, "usage": {"input_tokens": u[0], "output_tokens": u[1], "cache_read_input_tokens": u[2],
                                             "cache_creation_input_tokens": 0}}


@given(chat_turn().flatmap(lambda turn: st.tuples(st.just(turn), broken(_message(turn)))))
def test_any_message_becomes_a_valid_chat_completion_or_a_502(case):
    turn, (doc, was_broken) = case
    try:
        out = resp_messages_to_chat.translate_response(wire(doc), "m")
    except GatewayError as e:
        assert was_broken and is_bad_upstream(e), e
        return
    check(CHAT_COMPLETION, out)
    if not was_broken:
        assert (out["choices"][0]["message"]["content"] or "") == (turn["text"] or "")
        assert [json.loads(c["function"]["arguments"])["q"] for c in out["choices"][0]["message"].get("tool_calls") or ()] \
            == [a for _, a in turn["calls"]]


@given(chat_turn().flatmap(lambda turn: st.tuples(st.just(turn), st.just(events(_message(turn))))).flatmap(
    lambda c: st.tuples(st.just(c[0]), st.integers(0, len(c[1]) - 1).flatmap(
        lambda i: broken(c[1][i]).map(lambda b: ([*c[1][:i], b[0], *c[1][i + 1:]], b[1]))))),
    st.lists(st.integers(0, 10**6), max_size=4))
def test_any_messages_stream_becomes_a_chat_stream_that_ends(case, cuts):
    turn, (evs, was_broken) = case
    t = MessagesToChatStream({"stream_options": {"include_usage": True}}, "m")
    out = chunks_of(b"".join(t.feed(p) for p in pieces(sse(evs), cuts)) + t.close())
    assert out[-1] == "[DONE]" and out.count("[DONE]") == 1  # always ended, exactly once
    errors = [c for c in out[:-1] if "error" in c]
    assert not errors or (len(errors) == 1 and out[-2] is errors[0])
    if not was_broken:
        assert not errors
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out[:-1] if c.get("choices"))
        assert text == (turn["text"] or "")


@pytest.mark.parametrize(("extra", "thinks"), [
    ({}, True),
    ({"tool_choice": "required"}, False),  # Anthropic refuses thinking with a forced tool choice
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "w", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "r"}]}, False),  # mid tool loop, no signed thinking
])
def test_thinking_only_where_anthropic_takes_it(extra, thinks):
    body = {"model": "m", "max_tokens": 10, "reasoning_effort": "low", "tools": [WEATHER],
            "messages": [{"role": "user", "content": "q"}], **extra}
    out = req_chat_to_messages.translate_request(body)
    assert ("thinking" in out) is thinks and out["max_tokens"] == (10 + 1024 if thinks else 10)


# -- a Responses client's reasoning handed back to Claude ----------------------------------------------

SIGNED = [{"type": "thinking", "thinking": "plan", "signature": "sig-1"}, {"type": "redacted_thinking", "data": "x"}]


def test_sealed_thinking_opens_again_and_nothing_else_does():
    assert responses_on_messages.unseal(responses_on_messages.seal(SIGNED)) == SIGNED
    assert responses_on_messages.unseal("extproc.t1.not-base64!") == []
    assert responses_on_messages.unseal("gAAAA-openai-encrypted") == []
    assert responses_on_messages.unseal(responses_on_messages.PREFIX + "W3sidHlwZSI6ICJ0ZXh0In1d") == []  # a text block


def test_thinking_goes_back_to_the_assistant_turn_it_came_with():
    sealed = responses_on_messages.seal(SIGNED[:1])
    items = [{"role": "user", "content": "q"},
             {"type": "reasoning", "summary": [], "encrypted_content": sealed},
             {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "r"},
             {"role": "developer", "content": "note"},  # neither starts nor ends a turn
             {"role": "assistant", "content": "a"},
             {"role": "user", "content": "q2"},
             {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-someone-elses"},
             {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c2", "output": "r2"}]
    runs = responses_on_messages.thinking_runs(items)
    assert runs == [SIGNED[:1], [], []]
    body = {"model": "claude-x", "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
            "reasoning": {"effort": "low"}, "input": items}
    pair = ResponsesOnMessages(body, parse_config(_MESSAGES_BACKEND, env={}).backends[0], "claude-x")
    out = pair.request(body)
    assistant = [t for t in out["messages"] if t["role"] == "assistant"]
    assert assistant[0]["content"][0] == SIGNED[0] and assistant[1]["content"] == [{"type": "text", "text": "a"}]
    assert "thinking" not in out  # the last tool loop's turn has no signed thinking: Anthropic would refuse it


def test_a_streamed_reasoning_item_carries_the_signed_blocks():
    message = {**MESSAGE, "content": [MESSAGE["content"][0], MESSAGE["content"][2]]}
    body = {"model": "claude-x", "input": "q", "tools": [{"type": "function", "name": "w", "parameters": {}}]}
    pair = ResponsesOnMessages(body, parse_config(_MESSAGES_BACKEND, env={}).backends[0], "claude-x")
    t = pair.stream()
    raw = t.feed(sse(events(message))) + t.close()
    done = [e for e in chunks_of(raw) if e["type"] == "response.output_item.done" and e["item"]["type"] == "reasoning"]
    assert responses_on_messages.unseal(done[0]["item"]["encrypted_content"]) == [MESSAGE["content"][0]]
    assert t.response is not None
    assert responses_on_messages.unseal(t.response["output"][0]["encrypted_content"]) == [MESSAGE["content"][0]]
    buffered = pair.response(message).body
    assert responses_on_messages.unseal(buffered["output"][0]["encrypted_content"]) == [MESSAGE["content"][0]]
