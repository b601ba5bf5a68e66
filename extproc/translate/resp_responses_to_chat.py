"""A Response object from a Responses-only model, rewritten as the chat.completion a Chat client expects."""

from __future__ import annotations

from typing import Any

from extproc.translate.common import finish_reason, now, usage_responses_to_chat


def chat_id(response_id: str) -> str:
    return "chatcmpl-" + response_id.removeprefix("resp_")


def tool_call_of(item: dict[str, Any]) -> dict[str, Any] | None:
    """The chat tool_call for a function or custom tool call output item, else None."""
    kind = item.get("type")
    if kind == "function_call":
        return {"id": item.get("call_id") or item.get("id"), "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or ""}}
    if kind == "custom_tool_call":
        return {"id": item.get("call_id") or item.get("id"), "type": "custom",
                "custom": {"name": item.get("name", ""), "input": item.get("input") or ""}}
    return None


def reasoning_text(item: dict[str, Any]) -> str:
    """Reasoning summary text, else the raw reasoning text, of a reasoning item."""
    parts = item.get("summary") or item.get("content") or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def translate_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    text: list[str] = []
    refusal: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[Any] = []
    for item in resp.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    text.append(part.get("text", ""))
                    logprobs.extend(part.get("logprobs") or [])
                elif part.get("type") == "refusal":
                    refusal.append(part.get("refusal", ""))
        elif item.get("type") == "reasoning":
            reasoning.append(reasoning_text(item))
        elif (call := tool_call_of(item)) is not None:
            calls.append(call)
    incomplete = resp.get("incomplete_details") or {}
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
        "id": chat_id(str(resp.get("id") or "")),
        "object": "chat.completion",
        "created": int(resp.get("created_at") or now()),
        "model": resp.get("model") or model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
            "finish_reason": finish_reason(resp.get("status"), incomplete.get("reason"), bool(calls)),
        }],
        "usage": usage_responses_to_chat(resp.get("usage")),
        "service_tier": resp.get("service_tier"),
        "system_fingerprint": None,
    }
