"""Pieces both directions share: ids, usage, finish reasons, field checks."""

from __future__ import annotations

import os
import time
from typing import Any

from extproc.errors import invalid


def new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


def now() -> int:
    return int(time.time())


def is_default(value: Any) -> bool:
    """Values that ask for nothing: safe to leave out when the target API lacks the field."""
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


def expect(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind in (int, float, (int, float)) and isinstance(value, bool)):
        raise invalid(key, f"expected {what}, got {type(value).__name__}")
    return value


def text_of(parts: Any, field: str, kinds: tuple[str, ...]) -> str:
    """Join the text of content parts of the given kinds (a plain string passes through)."""
    if isinstance(parts, str):
        return parts
    if parts is None:
        return ""
    if not isinstance(parts, list):
        raise invalid(field, "expected a string or a list of content parts")
    out = []
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") not in kinds:
            raise invalid(f"{field}[{i}]", f"expected a content part of type {' or '.join(kinds)}")
        text = p.get("text", p.get("refusal"))
        if not isinstance(text, str):
            raise invalid(f"{field}[{i}].text", "expected a string")
        out.append(text)
    return "".join(out)


def usage_chat_to_responses(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(u, dict):
        return None
    inp = int(u.get("prompt_tokens") or 0)
    out = int(u.get("completion_tokens") or 0)
    pd = u.get("prompt_tokens_details") or {}
    cd = u.get("completion_tokens_details") or {}
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": int(pd.get("cached_tokens") or 0)},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": int(cd.get("reasoning_tokens") or 0)},
        "total_tokens": int(u.get("total_tokens") or inp + out),
    }


def usage_responses_to_chat(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(u, dict):
        return None
    inp = int(u.get("input_tokens") or 0)
    out = int(u.get("output_tokens") or 0)
    idt = u.get("input_tokens_details") or {}
    odt = u.get("output_tokens_details") or {}
    return {
        "prompt_tokens": inp,
        "completion_tokens": out,
        "total_tokens": int(u.get("total_tokens") or inp + out),
        "prompt_tokens_details": {"cached_tokens": int(idt.get("cached_tokens") or 0)},
        "completion_tokens_details": {"reasoning_tokens": int(odt.get("reasoning_tokens") or 0)},
    }


# Chat finish_reason -> (Response status, incomplete reason)
FINISH_TO_STATUS: dict[str | None, tuple[str, str | None]] = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "function_call": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


def finish_reason(status: str | None, incomplete_reason: str | None, called_tools: bool) -> str:
    if status == "incomplete":
        return "content_filter" if incomplete_reason == "content_filter" else "length"
    return "tool_calls" if called_tools else "stop"
