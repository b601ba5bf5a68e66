"""A Messages API request, rewritten for a model that only answers on /v1/responses.

The client keeps no state with the upstream, so the request is sent with `store: false`, and with
thinking asked for, with `include: ["reasoning.encrypted_content"]`: the encrypted reasoning comes
back as the thinking block's signature and goes upstream again as the reasoning item it was.
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


def translate_request(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The Responses request, and the Messages fields dropped for want of a Responses equivalent."""
    req = read_request(body, "responses")
    if req.stop:
        req.dropped.append("stop_sequences")
    return to_responses(req), req.dropped


def to_responses(req: MessagesRequest) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for turn in req.turns:
        if turn.role == "system":
            items.append({"type": "message", "role": "system",
                          "content": "".join(b.text for b in turn.blocks if isinstance(b, Text))})
        else:
            items.extend(_assistant(turn) if turn.role == "assistant" else _user(turn))
    out: dict[str, Any] = {"model": req.model, "input": items, "max_output_tokens": req.max_tokens, "store": False}
    if req.system:
        out["instructions"] = req.system
    for key, value in (("temperature", req.temperature), ("top_p", req.top_p), ("safety_identifier", req.user)):
        if value is not None:
            out[key] = value
    if req.effort is not None:
        out["reasoning"] = {"effort": req.effort, "summary": "auto"}
        out["include"] = ["reasoning.encrypted_content"]
    if req.schema is not None:
        out["text"] = {"format": {"type": "json_schema", "name": "output", "schema": req.schema, "strict": True}}
    if req.tools:
        # Anthropic's schemas are not held to OpenAI's strict subset: strict would refuse most of them.
        out["tools"] = [{"type": "function", "name": t.name, "parameters": t.schema, "strict": False,
                         **({"description": t.description} if t.description else {})} for t in req.tools]
        choice = req.choice
        if choice is not None:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.mode) or \
                {"type": "function", "name": choice.name}
            if not choice.parallel:
                out["parallel_tool_calls"] = False
    if req.stream:
        out["stream"] = True
    return out


def _content(blocks: list[Text | Image]) -> str | list[dict[str, Any]]:
    parts = [{"type": "input_text", "text": b.text} if isinstance(b, Text) else {"type": "input_image", "image_url": b.url}
             for b in blocks]
    if len(parts) == 1 and parts[0]["type"] == "input_text":
        return str(parts[0]["text"])
    return parts


def _user(turn: Turn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in turn.blocks:
        if isinstance(b, ToolResult):
            images = any(isinstance(p, Image) for p in b.content)
            output = _content(b.content) if images else b.text()
            if images and b.is_error:
                output = [{"type": "input_text", "text": "Error:"}, *output]
            out.append({"type": "function_call_output", "call_id": b.tool_use_id, "output": output})
    rest = [b for b in turn.blocks if isinstance(b, (Text, Image))]
    if rest:
        out.append({"type": "message", "role": "user", "content": _content(rest)})
    return out


def _assistant(turn: Turn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in turn.blocks:
        if isinstance(b, Thinking) and not b.ours:
            out.append({"type": "reasoning", "summary": [{"type": "summary_text", "text": b.text}] if b.text else [],
                        "encrypted_content": b.signature})
        elif isinstance(b, Text) and b.text:
            out.append({"type": "message", "role": "assistant", "content": b.text})
        elif isinstance(b, ToolUse):
            out.append({"type": "function_call", "call_id": b.id, "name": b.name, "arguments": b.arguments})
    return out
