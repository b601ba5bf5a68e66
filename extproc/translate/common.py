"""Pieces both directions share: ids, usage, finish reasons, field checks of a client's request.

A client's request is checked here (`expect`: 400, the client's fault); an upstream's answer, as
untrusted as a request, is decoded into the typed models of `wire` (502 `BadUpstream`, the upstream's
fault), so each value a translator uses is checked before it is used.
"""

from __future__ import annotations

import os
import time
from typing import Any

from extproc.errors import BadUpstream, invalid
from extproc.translate.wire import ChatChoice, ChatCompletion, ChatUsage, ResponsesUsage


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


def first_choice(chat: ChatCompletion) -> tuple[str, ChatChoice]:
    """(path, choice) of a chat.completion's first choice: the one with `index` 0 wherever it is listed
    (streams read only that one), else the first listed."""
    choices = chat.choices or []
    if not choices:
        raise BadUpstream("choices", "is missing or empty")
    i = next((i for i, c in enumerate(choices) if c.index == 0), 0)
    return f"choices[{i}]", choices[i]


def upstream_failure(err: Any, default: str) -> tuple[str, str]:
    """(code, message) of an error object an upstream sent mid-stream; whatever is not a string is left out."""
    if isinstance(err, str):
        return "upstream_error", err
    err = err if isinstance(err, dict) else {}
    code, message = err.get("code"), err.get("message")
    return (code if isinstance(code, str) and code else "upstream_error",
            message if isinstance(message, str) and message else default)


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


def usage_chat_to_responses(u: ChatUsage | None) -> dict[str, Any] | None:
    """The Responses usage object for the chat `usage` of an upstream answer (or chunk)."""
    if u is None:
        return None
    inp, out = u.prompt_tokens or 0, u.completion_tokens or 0
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
    reasoning = u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else None
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached or 0}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": reasoning or 0}, "total_tokens": u.total_tokens or inp + out}


def usage_responses_to_chat(u: ResponsesUsage | None) -> dict[str, Any] | None:
    """The chat usage object for the Responses `usage` of an upstream Response."""
    if u is None:
        return None
    inp, out = u.input_tokens or 0, u.output_tokens or 0
    cached = u.input_tokens_details.cached_tokens if u.input_tokens_details else None
    reasoning = u.output_tokens_details.reasoning_tokens if u.output_tokens_details else None
    return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": u.total_tokens or inp + out,
            "prompt_tokens_details": {"cached_tokens": cached or 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning or 0}}


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
