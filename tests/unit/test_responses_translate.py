"""Non-streaming responses, both directions (sans-IO), and schema conformance of what the sidecar builds."""

from __future__ import annotations

import pytest

from extproc.translate.resp_chat_to_responses import translate_response as chat_to_responses
from extproc.translate.resp_responses_to_chat import translate_response as responses_to_chat
from tests.conformance import validate_response

CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
              "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}}
RESP_USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 8,
              "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 20}


def chat(message: dict, finish: str = "stop", usage: dict | None = CHAT_USAGE) -> dict:
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1700000000, "model": "qwen3",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage}


REQUEST = {"model": "qwen3", "input": "hi", "instructions": "sys", "max_output_tokens": 50, "temperature": 0.3,
           "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
           "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
           "reasoning": {"effort": "low"}, "metadata": {"k": "v"}, "store": False, "user": "u1",
           "previous_response_id": "resp_prev"}


def test_chat_text_reasoning_and_calls():
    resp = chat_to_responses(chat({"content": "hello", "reasoning_content": "think", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "tool_calls"),
        REQUEST, "resp_1")
    validate_response(resp)
    assert resp["id"] == "resp_1" and resp["status"] == "completed" and resp["completed_at"]
    assert [i["type"] for i in resp["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert resp["output"][0]["id"].startswith("rs_") and resp["output"][0]["summary"][0]["text"] == "think"
    assert resp["output"][1]["id"].startswith("msg_") and resp["output"][1]["content"][0]["text"] == "hello"
    assert [(i["call_id"], i["arguments"]) for i in resp["output"][2:]] == [("call_1", "{}"), ("call_2", "{\"a\":1}")]
    assert all(i["id"].startswith("fc_") for i in resp["output"][2:])
    assert resp["usage"] == RESP_USAGE
    # request settings echoed
    assert (resp["instructions"], resp["max_output_tokens"], resp["temperature"]) == ("sys", 50, 0.3)
    assert resp["metadata"] == {"k": "v"} and resp["store"] is False and resp["user"] == "u1"
    assert resp["previous_response_id"] == "resp_prev" and resp["reasoning"]["effort"] == "low"
    assert resp["text"]["format"]["name"] == "out" and resp["tools"][0]["name"] == "f"


@pytest.mark.parametrize(("finish", "status", "reason"), [
    ("stop", "completed", None), ("length", "incomplete", "max_output_tokens"),
    ("content_filter", "incomplete", "content_filter")])
def test_finish_reasons(finish, status, reason):
    resp = chat_to_responses(chat({"content": "x"}, finish), {"model": "qwen3", "input": "x"})
    validate_response(resp)
    assert resp["status"] == status
    assert resp["incomplete_details"] == ({"reason": reason} if reason else None)
    assert resp["output"][0]["status"] == ("completed" if status == "completed" else "incomplete")


def test_refusal_and_no_usage():
    resp = chat_to_responses(chat({"content": None, "refusal": "no"}, usage=None), {"model": "m", "input": "x"})
    validate_response(resp)
    assert resp["output"][0]["content"] == [{"type": "refusal", "refusal": "no"}]
    assert resp["usage"] is None


def test_empty_answer_still_has_a_message():
    resp = chat_to_responses(chat({"content": None}), {"model": "m", "input": "x"})
    validate_response(resp)
    assert resp["output"][0]["content"][0]["text"] == ""


def response(output: list, status: str = "completed", reason: str | None = None) -> dict:
    return {"id": "resp_77", "object": "response", "created_at": 1700000000, "status": status,
            "model": "gpt-5.3-codex", "output": output, "usage": RESP_USAGE,
            "incomplete_details": {"reason": reason} if reason else None, "service_tier": "default"}


def test_responses_to_chat_everything():
    out = responses_to_chat(response([
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "plan"}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "a", "annotations": []},
                     {"type": "output_text", "text": "b", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "g", "arguments": "{\"x\":2}"},
    ]), "gpt-5.3-codex")
    assert out["id"] == "chatcmpl-77" and out["object"] == "chat.completion" and out["created"] == 1700000000
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "ab" and choice["message"]["reasoning_content"] == "plan"
    assert [c["id"] for c in choice["message"]["tool_calls"]] == ["call_1", "call_2"]
    assert choice["message"]["tool_calls"][1]["function"] == {"name": "g", "arguments": "{\"x\":2}"}
    assert out["usage"] == CHAT_USAGE


@pytest.mark.parametrize(("status", "reason", "finish"), [
    ("completed", None, "stop"), ("incomplete", "max_output_tokens", "length"),
    ("incomplete", "content_filter", "content_filter")])
def test_responses_status_to_finish(status, reason, finish):
    msg = {"type": "message", "id": "m", "role": "assistant", "content": [{"type": "output_text", "text": "t"}]}
    assert responses_to_chat(response([msg], status, reason), "m")["choices"][0]["finish_reason"] == finish


def test_responses_refusal():
    out = responses_to_chat(response([{"type": "message", "id": "m", "role": "assistant",
                                       "content": [{"type": "refusal", "refusal": "nope"}]}]), "m")
    assert out["choices"][0]["message"]["refusal"] == "nope" and out["choices"][0]["message"]["content"] is None


def test_the_first_choice_is_the_one_with_index_0_wherever_it_is_listed():
    doc = chat({"content": "first"})
    second = {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "stop"}
    doc["choices"] = [second, *doc["choices"]]
    resp = chat_to_responses(doc, REQUEST, "resp_1")
    assert resp["output"][0]["content"][0]["text"] == "first"
