"""A Response object from a Responses-only model, rewritten as the chat.completion a Chat client expects."""

from __future__ import annotations

from typing import Any

from extproc.errors import BadUpstream, GatewayError
from extproc.translate.common import (
    NUMBER,
    at,
    count,
    finish_reason,
    need,
    now,
    objects,
    read,
    upstream_failure,
    usage_responses_to_chat,
)


def chat_id(response_id: str) -> str:
    return "chatcmpl-" + response_id.removeprefix("resp_")


def tool_call_of(item: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The chat tool_call for a function or custom tool call output item, else None."""
    kind = item.get("type")
    if kind not in ("function_call", "custom_tool_call"):
        return None
    call_id = read(item, "call_id", str, where) or need(item, "id", str, where)
    name = need(item, "name", str, where)
    if kind == "function_call":
        return {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": read(item, "arguments", str, where) or ""}}
    return {"id": call_id, "type": "custom", "custom": {"name": name, "input": read(item, "input", str, where) or ""}}


def reasoning_text(item: dict[str, Any], where: str) -> str:
    """Reasoning summary text, else the raw reasoning text, of a reasoning item."""
    key = "summary" if item.get("summary") else "content"
    return "".join(read(part, "text", str, path) or "" for path, part in objects(item, key, where))


def _logprob(entry: dict[str, Any], where: str, top: bool = True) -> dict[str, Any]:
    """One token's logprob, rebuilt from its known fields so nothing else of the upstream's is copied."""
    raw = read(entry, "bytes", list, where) or []
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw):
        raise BadUpstream(at(where, "bytes"), "is not a list of byte values")
    out: dict[str, Any] = {"token": need(entry, "token", str, where), "logprob": need(entry, "logprob", NUMBER, where),
                           "bytes": raw}
    if top:
        out["top_logprobs"] = [_logprob(t, path, top=False) for path, t in objects(entry, "top_logprobs", where)]
    return out


def translate_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat.completion for a Response; BadUpstream when the answer lacks what it needs. A Response
    that failed is the upstream's error (502); one not finished yet cannot be a completion."""
    status = read(resp, "status", str)
    if status in ("queued", "in_progress"):
        raise BadUpstream("status", f"is {status!r}: the response is not finished")
    if status in ("failed", "cancelled"):
        code, why = upstream_failure(resp.get("error"), f"the upstream's response {status}")
        raise GatewayError(502, why, code=code)
    text: list[str] = []
    refusal: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[Any] = []
    for where, item in objects(resp, "output"):
        kind = read(item, "type", str, where)
        if kind == "message":
            for path, part in objects(item, "content", where):
                if part.get("type") == "output_text":
                    text.append(read(part, "text", str, path) or "")
                    logprobs.extend(_logprob(e, p) for p, e in objects(part, "logprobs", path))
                elif part.get("type") == "refusal":
                    refusal.append(read(part, "refusal", str, path) or "")
        elif kind == "reasoning":
            reasoning.append(reasoning_text(item, where))
        elif (call := tool_call_of(item, where)) is not None:
            calls.append(call)
    incomplete = read(resp, "incomplete_details", dict) or {}
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not (calls or refusal) else None,
        "refusal": "".join(refusal) if refusal else None,
    }
    if calls:
        message["tool_calls"] = calls
    if any(reasoning):
        message["reasoning_content"] = "\n\n".join(r for r in reasoning if r)
    return {
        "id": chat_id(read(resp, "id", str) or ""),
        "object": "chat.completion",
        "created": count(resp, "created_at") or now(),
        "model": read(resp, "model", str) or model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
            "finish_reason": finish_reason(read(resp, "status", str), read(incomplete, "reason", str, "incomplete_details"),
                                           bool(calls)),
        }],
        "usage": usage_responses_to_chat(resp),
        "service_tier": read(resp, "service_tier", str),
        "system_fingerprint": None,
    }
