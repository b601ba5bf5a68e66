"""Anthropic Messages clients on Responses-only models: the request, the buffered answer and the
stream, field by field, against expected values written out here (sans-IO)."""

from __future__ import annotations

import json

import pytest

from extproc.errors import BadUpstream, GatewayError
from extproc.translate import req_messages_to_responses, resp_responses_to_messages
from extproc.translate.sse import encode
from extproc.translate.stream_responses_to_messages import ResponsesToMessagesStream
from extproc.translate.tools import encode_reasoning
from tests.messages_conformance import check_messages_stream, messages_events

TOOL = {"name": "get_weather", "description": "Weather of a city", "input_schema": {"type": "object"}}


def test_a_full_request_maps_field_by_field():
    body = {"model": "m", "max_tokens": 99, "system": "Be brief.", "stream": True, "temperature": 0.5, "top_k": 4,
            "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}, "tools": [TOOL],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 20000},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Look"},
                                             {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "upstream's", "signature": "gAAAA-encrypted"},
                    {"type": "thinking", "thinking": "ours", "signature": encode_reasoning("ours")},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny",
                                              "is_error": True}]}]}
    out, dropped = req_messages_to_responses.translate_request(body)
    assert dropped == ["top_k", "stop_sequences"]
    assert out == {
        "model": "m", "max_output_tokens": 99, "store": False, "instructions": "Be brief.", "temperature": 0.5,
        "safety_identifier": "u-1", "stream": True, "parallel_tool_calls": False, "tool_choice": "required",
        "reasoning": {"effort": "high", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "text": {"format": {"type": "json_schema", "name": "output", "schema": {"type": "object"}, "strict": True}},
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather of a city",
                   "parameters": {"type": "object"}, "strict": False}],
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Look"},
                                                             {"type": "input_image", "image_url": "https://x/a.png"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "upstream's"}],
             "encrypted_content": "gAAAA-encrypted"},  # the sidecar's own signature has nothing to hand back
            {"type": "message", "role": "assistant", "content": "Checking."},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Error: sunny"}]}


def test_a_tool_choice_by_name():
    out, _ = req_messages_to_responses.translate_request({"model": "m", "max_tokens": 1, "tools": [TOOL],
                                                          "tool_choice": {"type": "tool", "name": "get_weather"},
                                                          "messages": [{"role": "user", "content": "q"}]})
    assert out["tool_choice"] == {"type": "function", "name": "get_weather"} and "parallel_tool_calls" not in out


def response(output: list, status: str = "completed", **kw) -> dict:
    return {"id": "resp_1", "object": "response", "status": status, "model": "gpt-5", "output": output,
            "usage": {"input_tokens": 100, "output_tokens": 30, "total_tokens": 130,
                      "input_tokens_details": {"cached_tokens": 40}}, **kw}


OUTPUT = [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Two cities."}],
           "encrypted_content": "ENC"},
          {"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": "Both:"}]},
          {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "w", "arguments": '{"city":"Paris"}'},
          {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "w", "arguments": '{"city":"Rome"}'}]
CONTENT = [{"type": "thinking", "thinking": "Two cities.", "signature": "ENC"}, {"type": "text", "text": "Both:"},
           {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Paris"}},
           {"type": "tool_use", "id": "call_2", "name": "w", "input": {"city": "Rome"}}]
USAGE = {"input_tokens": 60, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 40, "output_tokens": 30}


def test_a_response_becomes_a_message():
    out = resp_responses_to_messages.translate_response(response(OUTPUT), "asked")
    assert out["content"] == CONTENT and out["model"] == "gpt-5"
    assert (out["stop_reason"], out["stop_sequence"], out["usage"]) == ("tool_use", None, USAGE)


@pytest.mark.parametrize(("status", "details", "expected"), [
    ("completed", None, "end_turn"), ("incomplete", {"reason": "max_output_tokens"}, "max_tokens"),
    ("incomplete", {"reason": "content_filter"}, "refusal")])
def test_stop_reasons_of_a_status(status, details, expected):
    doc = response([{"type": "message", "content": [{"type": "output_text", "text": "x"}]}], status,
                   incomplete_details=details)
    assert resp_responses_to_messages.translate_response(doc, "m")["stop_reason"] == expected


def test_reasoning_without_encrypted_content_is_signed_by_the_sidecar():
    doc = response([{"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]}])
    assert resp_responses_to_messages.translate_response(doc, "m")["content"] == [
        {"type": "thinking", "thinking": "t", "signature": encode_reasoning("t")}]


def test_a_failed_response_is_a_502_and_an_unfinished_one_too():
    with pytest.raises(GatewayError) as e:
        resp_responses_to_messages.translate_response(response([], "failed", error={"code": "x", "message": "boom"}), "m")
    assert (e.value.status, e.value.message) == (502, "boom")
    with pytest.raises(BadUpstream):
        resp_responses_to_messages.translate_response(response([], "in_progress"), "m")


def events_of(resp: dict, split_args: bool = True) -> bytes:
    """A Responses stream as OpenAI sends it: each item added, its deltas, done; the second call's
    arguments only in `.done`, as some servers do."""
    evs: list[dict] = [{"type": "response.created", "response": {**resp, "status": "in_progress", "output": []}}]
    for i, item in enumerate(resp["output"]):
        base = {"item_id": item["id"], "output_index": i}
        if item["type"] == "reasoning":
            evs.append({"type": "response.output_item.added", "output_index": i, "item": {**item, "summary": []}})
            evs += [{"type": "response.reasoning_summary_text.delta", **base, "summary_index": 0, "delta": d}
                    for d in ("Two ", "cities.")]
        elif item["type"] == "message":
            evs.append({"type": "response.output_item.added", "output_index": i, "item": {**item, "content": []}})
            evs.append({"type": "response.output_text.delta", **base, "content_index": 0, "delta": "Both:"})
        else:
            evs.append({"type": "response.output_item.added", "output_index": i, "item": {**item, "arguments": ""}})
            if split_args and i == 2:
                evs += [{"type": "response.function_call_arguments.delta", **base, "delta": d}
                        for d in ('{"city":', '"Paris"}')]
            evs.append({"type": "response.function_call_arguments.done", **base, "arguments": item["arguments"]})
        evs.append({"type": "response.output_item.done", "output_index": i, "item": item})
    evs.append({"type": "response.completed", "response": resp})
    return b"".join(encode(json.dumps({**e, "sequence_number": n}).encode(), e["type"]) for n, e in enumerate(evs))


def translate(raw: bytes, cut: int | None = None) -> list[dict]:
    t = ResponsesToMessagesStream("asked")
    chunks = [raw] if cut is None else [raw[:cut], raw[cut:]]
    return messages_events(b"".join(t.feed(c) for c in chunks) + t.close())


def test_a_responses_stream_follows_the_grammar_and_carries_everything():
    events = translate(events_of(response(OUTPUT)))
    msg = check_messages_stream(events)
    assert msg["content"] == CONTENT and msg["stop_reason"] == "tool_use" and msg["usage"] == USAGE
    args = [e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"]
    assert args == ['{"city":', '"Paris"}', '{"city":"Rome"}']  # deltas as they came, a call sent only in .done whole


def test_every_split_point_gives_the_same_stream():
    raw = events_of(response(OUTPUT))
    whole = [{k: v for k, v in e.items() if k != "message"} for e in translate(raw)]
    for cut in range(1, len(raw), 7):
        assert [{k: v for k, v in e.items() if k != "message"} for e in translate(raw, cut)] == whole, cut


@pytest.mark.parametrize(("tail", "message"), [
    (b"", "ended before the response completed"),
    (encode(b'{"type": "response.failed", "response": {"error": {"code": "server_error", "message": "boom"}}}'), "boom"),
    (encode(b'{"type": "error", "code": "rate_limit_exceeded", "message": "slow down"}'), "slow down"),
    (encode(b'[1]'), "expected an object"),
])
def test_a_broken_stream_ends_with_an_error_event(tail, message):
    raw = events_of(response(OUTPUT))
    cut = raw.index(b"event: response.output_item.added", raw.index(b"response.output_text.delta"))
    msg = check_messages_stream(translate(raw[:cut] + tail))
    assert msg["error"] is not None and message in msg["error"]["message"], msg["error"]


def test_a_rate_limit_mid_stream_is_anthropics_rate_limit_error():
    msg = check_messages_stream(translate(encode(b'{"type": "error", "code": "rate_limit_exceeded", "message": "x"}')))
    assert msg["error"] == {"type": "rate_limit_error", "message": "x"}


def test_a_json_answer_is_replayed_as_the_stream():
    t = ResponsesToMessagesStream("m")
    msg = check_messages_stream(messages_events(t.replay(response(OUTPUT))))
    assert msg["content"] == CONTENT and msg["usage"] == USAGE
    assert t.response is not None and t.response["usage"]["input_tokens"] == 100
