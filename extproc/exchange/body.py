"""The request body as the sidecar accepts it: media type, encoding, and one strict JSON parse.

Client bytes are untrusted: whatever is refused here gets a 4xx in the OpenAI error shape.
"""

from __future__ import annotations

import json
from email.message import Message
from functools import lru_cache
from typing import Any

import orjson

from extproc.errors import GatewayError

# Nesting allowed in a request. orjson reads 1024 levels but writes only 254, and translation and
# stored turns put a request's values a few levels deeper: refused here, not failed on the way out.
MAX_DEPTH = 128


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """(type/subtype lowercased, parameters) of a Content-Type value (RFC 9110 section 8.3), parsed
    by the standard library's MIME header parser; a malformed value reads as text/plain."""
    msg = Message()
    msg["content-type"] = content_type
    return msg.get_content_type(), {k.lower(): v for k, v in msg.get_params(failobj=[])[1:]}


@lru_cache(maxsize=256)
def is_json(content_type: str) -> bool:
    """application/json or a structured `+json` type (RFC 6839), in UTF-8 if a charset is named.
    Cached: clients send a handful of distinct values, and the MIME parser costs a tenth of a
    pass-through exchange's Python."""
    mtype, params = media_type(content_type)
    kind, _, subtype = mtype.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json")) \
        and params.get("charset", "utf-8").lower() in ("utf-8", "utf8")


def check_json_request(headers: dict[str, str]) -> None:
    """An API request must be uncompressed JSON."""
    ctype = headers.get("content-type", "")
    if not is_json(ctype):
        raise GatewayError(415, f"content-type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise GatewayError(415, "compressed request bodies are not supported; send the JSON uncompressed",
                           code="unsupported_content_encoding")


def _too_deep(doc: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels; one pass per level, no recursion."""
    level = [doc] if isinstance(doc, (dict, list)) else []
    for _ in range(limit):
        level = [child for c in level for child in (c.values() if isinstance(c, dict) else c)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def _first_duplicate(raw: bytes) -> str | None:
    """A top-level key given more than once, compared after JSON unescaping (`"model"` and
    `"\\u006dodel"` are one key). The top-level object is the last one the hook sees."""
    top: list[tuple[str, Any]] = []

    def keep(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        nonlocal top
        top = pairs
        return pairs

    json.loads(raw, object_pairs_hook=keep)
    seen: set[str] = set()
    for key, _ in top:
        if key in seen:
            return key
        seen.add(key)
    return None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, parsed once. Nesting is bounded, and duplicate top-level keys are
    refused: the sidecar and the upstream could each take a different one (route by one `model`,
    run the other; check one `stream`, answer the other)."""
    if not raw.strip():
        raise GatewayError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    if _too_deep(body, MAX_DEPTH):
        raise GatewayError(400, f"request body nests more than {MAX_DEPTH} levels deep", code="invalid_json")
    if (dup := _first_duplicate(raw)) is not None:
        raise GatewayError(400, f"request body has the key {dup!r} more than once", param=dup, code="duplicate_key")
    return body
