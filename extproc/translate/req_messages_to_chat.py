"""A Messages API request, rewritten for a backend that only serves /v1/chat/completions.

Each Anthropic turn becomes chat messages in order: a user turn's `tool_result` blocks become `tool`
messages (first, answering the assistant's calls), its other blocks one user message; an assistant
turn's text, `tool_use` blocks (tool_calls) and, where the backend takes it back, its thinking
(`reasoning_content`).
"""

from __future__ import annotations

from typing import Any

from extproc.translate.messages import (
    Image,
    MessagesRequest,
    Text,
    Thinking,
    ToolResult,
    ToolUse,
    Turn,
    read_request,
)


def translate_request(body: dict[str, Any], *, max_tokens_field: str = "max_completion_tokens",
                      replay_reasoning: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The chat request, and the Messages fields dropped for want of a chat equivalent."""
    req = read_request(body, "chat")
    return to_chat(req, max_tokens_field, replay_reasoning), req.dropped


def to_chat(req: MessagesRequest, max_tokens_field: str, replay_reasoning: bool) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": req.system}] if req.system else []
    for turn in req.turns:
        if turn.role == "system":
            messages.append({"role": "system", "content": "".join(b.text for b in turn.blocks if isinstance(b, Text))})
        else:
            messages.extend(_assistant(turn, replay_reasoning) if turn.role == "assistant" else _user(turn))
    out: dict[str, Any] = {"model": req.model, "messages": messages, max_tokens_field: req.max_tokens}
    for key, value in (("temperature", req.temperature), ("top_p", req.top_p), ("user", req.user)):
        if value is not None:
            out[key] = value
    if req.stop:
        out["stop"] = req.stop
    if req.effort is not None:
        out["reasoning_effort"] = req.effort
    if req.schema is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": req.schema,
                                                                         "strict": True}}
    if req.tools:
        out["tools"] = [{"type": "function", "function": {"name": t.name, "parameters": t.schema,
                                                          **({"description": t.description} if t.description else {})}}
                        for t in req.tools]
        choice = req.choice
        if choice is not None:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.mode) or \
                {"type": "function", "function": {"name": choice.name}}
            if not choice.parallel:
                out["parallel_tool_calls"] = False
    if req.stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _user(turn: Turn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                                 for b in turn.blocks if isinstance(b, ToolResult)]
    parts: list[dict[str, Any]] = []
    for b in turn.blocks:
        if isinstance(b, Text):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, Image):
            parts.append({"type": "image_url", "image_url": {"url": b.url}})
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})  # the plain form every chat server accepts
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _assistant(turn: Turn, replay_reasoning: bool) -> list[dict[str, Any]]:
    text = "".join(b.text for b in turn.blocks if isinstance(b, Text))
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.arguments}}
             for b in turn.blocks if isinstance(b, ToolUse)]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    thought = "".join(b.text for b in turn.blocks if isinstance(b, Thinking))
    if replay_reasoning and thought:
        message["reasoning_content"] = thought
    return [message]
