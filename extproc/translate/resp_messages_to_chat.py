"""A Message from an Anthropic-compatible backend, rewritten as the chat.completion a Chat client expects.

Text blocks join into `content`, thinking into `reasoning_content` (as vLLM and others send reasoning),
tool_use blocks into `tool_calls`; cached input is counted within `prompt_tokens`, as OpenAI counts it.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import count, need, now, objects, read

# Messages stop_reason -> chat finish_reason
FINISH_OF_STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}


def chat_usage(usage: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """Chat usage for a Messages `usage` object, checked: input counted whole, cache reads within it."""
    if usage is None:
        return None
    fresh, written, read_ = (count(usage, k, where) for k in
                             ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    out = count(usage, "output_tokens", where)
    return {"prompt_tokens": fresh + written + read_, "completion_tokens": out, "total_tokens": fresh + written + read_ + out,
            "prompt_tokens_details": {"cached_tokens": read_}, "completion_tokens_details": {"reasoning_tokens": 0}}


def finish_of(stop: str | None, called: bool) -> str:
    return "tool_calls" if called and stop in (None, "tool_use") else FINISH_OF_STOP.get(stop or "end_turn", "stop")


def chat_id(message_id: str | None) -> str:
    return "chatcmpl-" + (message_id or "").removeprefix("msg_")


def tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    tool_input = read(block, "input", dict, where) or {}
    return {"id": need(block, "id", str, where), "type": "function",
            "function": {"name": need(block, "name", str, where), "arguments": orjson.dumps(tool_input).decode()}}


def translate_response(msg: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat.completion for a Message; BadUpstream when the answer lacks what it needs."""
    if read(msg, "type", str) != "message":
        raise BadUpstream("type", "is not 'message'")
    text: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for where, block in objects(msg, "content"):
        kind = read(block, "type", str, where)
        if kind == "text":
            text.append(need(block, "text", str, where))
        elif kind == "thinking":
            thinking.append(read(block, "thinking", str, where) or "")
        elif kind == "tool_use":
            calls.append(tool_call(block, where))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if any(thinking):
        message["reasoning_content"] = "".join(thinking)
    return {"id": chat_id(read(msg, "id", str)), "object": "chat.completion", "created": now(),
            "model": read(msg, "model", str) or model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_of(read(msg, "stop_reason", str), bool(calls))}],
            "usage": chat_usage(read(msg, "usage", dict), "usage"), "system_fingerprint": None}
