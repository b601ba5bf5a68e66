"""A Response object from a Responses-only model, rewritten as the chat.completion a Chat client expects."""

from __future__ import annotations

from typing import Any

from extproc.errors import BadUpstream, GatewayError
from extproc.translate.common import finish_reason, now, upstream_failure
from extproc.translate.wire import Logprob, OutputItem, ResponseObject, TopLogprob, convert


def chat_id(response_id: str) -> str:
    return "chatcmpl-" + response_id.removeprefix("resp_")


def tool_call_of(item: OutputItem, where: str) -> dict[str, Any] | None:
    """The chat tool_call for a function or custom tool call output item, else None."""
    if item.type not in ("function_call", "custom_tool_call"):
        return None
    call_id = item.call_id or item.id
    if call_id is None:
        raise BadUpstream(f"{where}.id", "is missing")
    if item.name is None:
        raise BadUpstream(f"{where}.name", "is missing")
    if item.type == "function_call":
        return {"id": call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments or ""}}
    return {"id": call_id, "type": "custom", "custom": {"name": item.name, "input": item.input or ""}}


def reasoning_text(item: dict[str, Any], where: str) -> str:
    """Reasoning summary text, else the raw reasoning text, of a reasoning item read as a dict."""
    return convert(item, OutputItem, "item", where).reasoning_text()


def _logprob(entry: TopLogprob) -> dict[str, Any]:
    """One token's logprob, rebuilt from its known fields so nothing else of the upstream's is copied."""
    out: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes or []}
    if isinstance(entry, Logprob):
        out["top_logprobs"] = [_logprob(t) for t in entry.top_logprobs or ()]
    return out


def translate_response(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat.completion for a Response; BadUpstream when the answer lacks what it needs. A Response
    that failed is the upstream's error (502); one not finished yet cannot be a completion."""
    resp = convert(doc, ResponseObject, "body")
    if resp.status in ("queued", "in_progress"):
        raise BadUpstream("status", f"is {resp.status!r}: the response is not finished")
    if resp.status in ("failed", "cancelled"):
        code, why = upstream_failure(resp.error, f"the upstream's response {resp.status}")
        raise GatewayError(502, why, code=code)
    text: list[str] = []
    refusal: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []
    for i, item in enumerate(resp.output or ()):
        if item.type == "message":
            for part in item.content or ():
                if part.type == "output_text":
                    text.append(part.text or "")
                    logprobs.extend(_logprob(e) for e in part.logprobs or ())
                elif part.type == "refusal":
                    refusal.append(part.refusal or "")
        elif item.type == "reasoning":
            reasoning.append(item.reasoning_text())
        elif (call := tool_call_of(item, f"output[{i}]")) is not None:
            calls.append(call)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not (calls or refusal) else None,
        "refusal": "".join(refusal) if refusal else None,
    }
    if calls:
        message["tool_calls"] = calls
    if any(reasoning):
        message["reasoning_content"] = "\n\n".join(r for r in reasoning if r)
    incomplete = resp.incomplete_details.reason if resp.incomplete_details else None
    return {
        "id": chat_id(resp.id or ""),
        "object": "chat.completion",
        "created": resp.created_at or now(),
        "model": resp.model or model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
            "finish_reason": finish_reason(resp.status, incomplete, bool(calls)),
        }],
        "usage": resp.usage.as_chat() if resp.usage else None,
        "service_tier": resp.service_tier,
        "system_fingerprint": None,
    }
