"""A Response from a Responses-only model, rewritten as the Message an Anthropic client expects.

Reasoning becomes a thinking block whose signature is the reasoning's `encrypted_content` (handed back
upstream on the next turn), or the sidecar's own when the upstream sent none.
"""

from __future__ import annotations

from typing import Any

from extproc.errors import BadUpstream, GatewayError
from extproc.translate.common import need, new_id, objects, read, upstream_failure
from extproc.translate.messages import (
    message_shell,
    stop_of_status,
    thinking_block,
    tool_input,
    usage_of_responses,
)
from extproc.translate.resp_responses_to_chat import reasoning_text


def translate_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """The Message for a finished Response; a failed one is the upstream's error (502)."""
    status = read(resp, "status", str)
    if status in ("queued", "in_progress"):
        raise BadUpstream("status", f"is {status!r}: the response is not finished")
    if status in ("failed", "cancelled"):
        code, why = upstream_failure(resp.get("error"), f"the upstream's response {status}")
        raise GatewayError(502, why, code=code)
    message = message_shell(new_id("msg_"), read(resp, "model", str) or model)
    content = message["content"]
    refused = False
    for where, item in objects(resp, "output"):
        kind = read(item, "type", str, where)
        if kind == "reasoning":
            content.append(thinking_block(reasoning_text(item, where), read(item, "encrypted_content", str, where)))
        elif kind == "message":
            for path, part in objects(item, "content", where):
                if part.get("type") == "output_text":
                    content.append({"type": "text", "text": need(part, "text", str, path)})
                elif part.get("type") == "refusal":
                    content.append({"type": "text", "text": need(part, "refusal", str, path)})
                    refused = True
        elif kind == "function_call":
            content.append({"type": "tool_use", "id": need(item, "call_id", str, where),
                            "name": need(item, "name", str, where),
                            "input": tool_input(read(item, "arguments", str, where) or "", f"{where}.arguments")})
    incomplete = read(resp, "incomplete_details", dict) or {}
    reason = stop_of_status(status, read(incomplete, "reason", str, "incomplete_details"),
                            any(b["type"] == "tool_use" for b in content))
    message["stop_reason"] = "refusal" if refused and reason == "end_turn" else reason
    message["usage"] = usage_of_responses(resp) or message["usage"]
    return message
