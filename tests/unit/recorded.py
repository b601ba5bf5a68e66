"""Streams as real servers send them, for the stream translator tests."""

from __future__ import annotations

import json


def _chat(*deltas: tuple[dict, str | None], usage: dict | None = None) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "qwen3"}
    out = [b": keep-alive comment\r\n\r\n"]
    for delta, finish in deltas:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        out.append(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
    if usage:
        out.append(b"data:" + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\r\n\r\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


CHAT_USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
              "completion_tokens_details": {"reasoning_tokens": 4}}

# vLLM with a reasoning parser: reasoning, then text with multi-byte characters, then two parallel calls.
CHAT_REASONING_TEXT_TOOLS = _chat(
    ({"role": "assistant", "content": ""}, None),
    ({"reasoning_content": "Need "}, None),
    ({"reasoning_content": "weather."}, None),
    ({"content": "Checking "}, None),
    ({"content": "Zürich ☀️"}, None),
    ({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]},
     None),
    ({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}, None),
    ({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                      "function": {"name": "time", "arguments": "{\"tz\":"}}]}, None),
    ({"tool_calls": [{"index": 0, "function": {"arguments": "\"Zürich\"}"}}]}, None),
    ({"tool_calls": [{"index": 1, "function": {"arguments": "\"CET\"}"}}]}, None),
    ({}, "tool_calls"),
    usage=CHAT_USAGE,
)

CHAT_LENGTH = _chat(({"role": "assistant", "content": "cut"}, None), ({"content": " off"}, "length"), usage=CHAT_USAGE)

CHAT_NO_FINISH = _chat(({"role": "assistant", "content": "half"}, None))[: -len(b"data: [DONE]\n\n")]

CHAT_ERROR = _chat(({"role": "assistant", "content": "so"}, None)).replace(
    b"data: [DONE]", b'data: {"error": {"message": "engine died", "code": "internal"}}')


def _resp_events(*events: dict) -> bytes:
    out = []
    for seq, ev in enumerate(events):
        ev = {"type": ev["type"], "sequence_number": seq, **ev}
        out.append(f"event: {ev['type']}\r\ndata: {json.dumps(ev, ensure_ascii=False)}\r\n\r\n".encode())
    return b"".join(out)


_SHELL = {"id": "resp_abc", "object": "response", "created_at": 1700000000, "status": "in_progress",
          "model": "gpt-5.3-codex", "output": []}
_FC1 = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather",
        "arguments": "{\"city\":\"Zürich\"}", "status": "completed"}
_FC2 = {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "time", "arguments": "{\"tz\":\"CET\"}",
        "status": "completed"}
_USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 9,
          "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 29}

# OpenAI-style: reasoning summary, text, a call with argument deltas and a call whose arguments
# arrive only in output_item.done.
RESPONSES_FULL = _resp_events(
    {"type": "response.created", "response": _SHELL},
    {"type": "response.in_progress", "response": _SHELL},
    {"type": "response.output_item.added", "output_index": 0, "item": {"type": "reasoning", "id": "rs_1", "summary": []}},
    {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0, "summary_index": 0,
     "delta": "Think"},
    {"type": "response.output_item.done", "output_index": 0,
     "item": {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Think"}]}},
    {"type": "response.output_item.added", "output_index": 1,
     "item": {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []}},
    {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0, "delta": "Zü"},
    {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0, "delta": "rich"},
    {"type": "response.output_item.added", "output_index": 2, "item": {**_FC1, "arguments": "", "status": "in_progress"}},
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2, "delta": "{\"city\":"},
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2, "delta": "\"Zürich\"}"},
    {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 2,
     "arguments": _FC1["arguments"]},
    {"type": "response.output_item.done", "output_index": 2, "item": _FC1},
    {"type": "response.output_item.added", "output_index": 3, "item": {**_FC2, "arguments": "", "status": "in_progress"}},
    {"type": "response.output_item.done", "output_index": 3, "item": _FC2},
    {"type": "response.completed", "response": {**_SHELL, "status": "completed", "usage": _USAGE}},
)

RESPONSES_INCOMPLETE = _resp_events(
    {"type": "response.created", "response": _SHELL},
    {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "cu"},
    {"type": "response.incomplete", "response": {**_SHELL, "status": "incomplete",
                                                 "incomplete_details": {"reason": "max_output_tokens"}}},
)

RESPONSES_FAILED = _resp_events(
    {"type": "response.created", "response": _SHELL},
    {"type": "response.failed", "response": {**_SHELL, "status": "failed",
                                             "error": {"code": "server_error", "message": "boom"}}},
)
