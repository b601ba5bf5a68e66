"""Pieces both directions share: ids, usage, finish reasons, field checks.

Field checks come in two kinds: a client's request (`expect`: 400, the client's fault) and an
upstream's answer (502 `BadUpstream`, the upstream's fault). An upstream answer is as untrusted as a
request: the Chat Completions <-> Responses translators decode it into the typed models of `wire`;
`read`, `need`, `objects` and `count` check the fields of an answer a translator reads as a dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from extproc.errors import BadUpstream, invalid
from extproc.translate.wire import ChatUsage, ResponsesUsage, convert

NUMBER = (int, float)
_WHAT: dict[Any, str] = {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "a boolean",
                         NUMBER: "a number"}
_MAX_COUNT = 2**64  # orjson writes unsigned 64-bit integers at most


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


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _WHAT[type(value)]


def at(where: str, key: str | int) -> str:
    """The JSON path of a field, as error messages name it: `choices[0].message`."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def read(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """An optional field of an upstream answer: None when absent or null, else a value of `kind`."""
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadUpstream(at(where, key), f"is {json_type(value)}, expected {_WHAT[kind]}")
    return value


def need(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """A field of an upstream answer the translator cannot do without."""
    value = read(doc, key, kind, where)
    if value is None:
        raise BadUpstream(at(where, key), "is missing")
    return value


def objects(doc: dict[str, Any], key: str, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, object) for each element of an optional list of objects in an upstream answer."""
    for i, item in enumerate(read(doc, key, list, where) or ()):
        path = at(at(where, key), i)
        if not isinstance(item, dict):
            raise BadUpstream(path, f"is {json_type(item)}, expected an object")
        yield path, item


def first_choice(chat: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path, choice) of a chat.completion's first choice: the one with `index` 0 wherever it is listed
    (streams read only that one), else the first listed."""
    choices = list(objects(chat, "choices"))
    if not choices:
        raise BadUpstream("choices", "is missing or empty")
    return next((c for c in choices if c[1].get("index") == 0), choices[0])


def count(doc: dict[str, Any], key: str, where: str = "") -> int:
    """A token count or timestamp of an upstream answer: a non-negative integer, 0 when absent."""
    value = doc.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, NUMBER) or not 0 <= value < _MAX_COUNT \
            or value != int(value):
        shown = f" ({str(value)[:40]!r})" if isinstance(value, (str, int, float)) else ""  # never a deep repr
        raise BadUpstream(at(where, key), f"is {json_type(value)}{shown}, expected a non-negative integer")
    return int(value)


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


def usage_chat_to_responses(doc: dict[str, Any], where: str = "") -> dict[str, Any] | None:
    """The Responses usage object for the chat `usage` of an upstream answer read as a dict."""
    u = doc.get("usage")
    return None if u is None else convert(u, ChatUsage, "usage", at(where, "usage")).as_responses()


def usage_responses_to_chat(doc: dict[str, Any], where: str = "") -> dict[str, Any] | None:
    """The chat usage object for the Responses `usage` of an upstream Response read as a dict."""
    u = doc.get("usage")
    return None if u is None else convert(u, ResponsesUsage, "usage", at(where, "usage")).as_chat()


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
