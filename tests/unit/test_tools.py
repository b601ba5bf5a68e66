"""Responses tools a chat backend does not have: namespaces, custom tools, hosted tools, reasoning replay."""

from __future__ import annotations

import json

import pytest

from extproc.errors import GatewayError
from extproc.translate import resp_chat_to_responses
from extproc.translate.req_responses_to_chat import translate_request
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from extproc.translate.tools import decode_reasoning, encode_reasoning
from tests.conformance import sse_events

TOOLS = [
    {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}},
    {"type": "namespace", "name": "agents", "description": "Sub-agents", "tools": [
        {"type": "function", "name": "spawn", "description": "Start one", "parameters": {"type": "object"}}]},
    {"type": "custom", "name": "apply_patch", "description": "Patch files",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "web_search", "external_web_access": True},
]


def chat_call(name: str, args: str, i: int = 0) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


def test_tools_flattened_for_chat():
    out = translate_request({"model": "m", "input": "hi", "tools": TOOLS, "tool_choice": {"type": "custom", "name": "apply_patch"}})
    fns = {t["function"]["name"]: t["function"] for t in out["tools"]}
    assert list(fns) == ["exec_command", "agents__spawn", "apply_patch"]  # web_search dropped
    assert fns["agents__spawn"]["description"] == "[agents] Start one"
    assert fns["apply_patch"]["parameters"]["required"] == ["input"]
    assert "start: /.+/" in fns["apply_patch"]["description"]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}
    with pytest.raises(GatewayError) as e:
        translate_request({"model": "m", "input": "hi", "tools": TOOLS}, hosted_tools="reject")
    assert "web_search" in e.value.message
    out = translate_request({"model": "m", "input": "hi", "tools": TOOLS, "tool_choice": {"type": "web_search"}})
    assert "tool_choice" not in out


def test_calls_map_back_to_namespace_and_custom_items():
    chat = {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            chat_call("agents__spawn", '{"task": "x"}'), chat_call("apply_patch", '{"input": "*** Begin Patch"}', 1)]}}]}
    out = resp_chat_to_responses.translate_response(chat, {"model": "m", "tools": TOOLS})["output"]
    assert {k: out[0][k] for k in ("type", "name", "namespace", "arguments")} == {
        "type": "function_call", "name": "spawn", "namespace": "agents", "arguments": '{"task": "x"}'}
    assert {k: out[1][k] for k in ("type", "name", "input", "call_id")} == {
        "type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch", "call_id": "call_1"}


def test_streamed_custom_call_sends_its_input_whole():
    stream = ChatToResponsesStream({"model": "m", "tools": TOOLS, "stream": True})
    base = {"id": "c", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    chunks = [{"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                               "function": {"name": "apply_patch", "arguments": '{"inp'}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": 'ut": "line\\n"}'}}]}]
    data = b"".join(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}).encode()
                    + b"\n\n" for d in chunks)
    data += b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).encode()
    events = sse_events(stream.feed(data + b"\n\ndata: [DONE]\n\n") + stream.close())
    types = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" not in types
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == "line\n"
    assert events[-1]["response"]["output"][0]["type"] == "custom_tool_call"
    assert events[-1]["response"]["output"][0]["input"] == "line\n"


def test_replayed_items_become_chat_messages():
    out = translate_request({"model": "m", "tools": TOOLS, "input": [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "id": "msg_2", "role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque-from-openai"},
        {"type": "function_call", "id": "fc_1", "call_id": "a", "name": "spawn", "namespace": "agents",
         "arguments": "{}", "status": "completed"},
        {"type": "custom_tool_call", "id": "ctc_1", "call_id": "b", "name": "apply_patch", "input": "P"},
        {"type": "function_call_output", "call_id": "a", "output": "started"},
        {"type": "custom_tool_call_output", "call_id": "b", "output": "patched"},
        {"type": "message", "id": "msg_3", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "done", "annotations": []}]},
    ]})
    assert out["messages"] == [
        {"role": "system", "content": "rules"}, {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [chat_call("agents__spawn", "{}") | {"id": "a"},
                                                              chat_call("apply_patch", '{"input":"P"}') | {"id": "b"}]},
        {"role": "tool", "tool_call_id": "a", "content": "started"},
        {"role": "tool", "tool_call_id": "b", "content": "patched"},
        {"role": "assistant", "content": "done"}]


def test_reasoning_round_trip():
    chat = {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "42", "reasoning_content": "think hard"}}]}
    request = {"model": "m", "include": ["reasoning.encrypted_content"]}
    reasoning, message = resp_chat_to_responses.translate_response(chat, request)["output"]
    assert decode_reasoning(reasoning) == "think hard" and reasoning["encrypted_content"] == encode_reasoning("think hard")
    history = [{"type": "message", "role": "user", "content": "q"}, reasoning, message,
               {"type": "message", "role": "user", "content": "again"}]
    dropped = translate_request({"model": "m", "input": history})["messages"]
    assert dropped[1] == {"role": "assistant", "content": "42"}  # never replayed as text
    kept = translate_request({"model": "m", "input": history}, replay_reasoning=True)["messages"]
    assert kept[1] == {"role": "assistant", "content": "42", "reasoning_content": "think hard"}
    assert decode_reasoning({"encrypted_content": "extproc.r1.%%%"}) is None
