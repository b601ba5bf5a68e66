"""The request body as the sidecar accepts it: media type, encoding, and one strict JSON parse.

Client bytes are untrusted: whatever is refused here gets a 4xx in the OpenAI error shape.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from extproc.errors import GatewayError


def is_json(content_type: str) -> bool:
    return "json" in content_type


def check_json_request(headers: dict[str, str]) -> None:
    """An API request must be uncompressed JSON."""
    ctype = headers.get("content-type", "")
    if not is_json(ctype):
        raise GatewayError(415, f"content-type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")
    if headers.get("content-encoding", "identity") != "identity":
        raise GatewayError(415, "compressed request bodies are not supported; send the JSON uncompressed",
                           code="unsupported_content_encoding")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, parsed once. Duplicate top-level keys are refused: the sidecar and the
    upstream could each take a different one (route by one `model`, run the other)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    if raw.count(b'"model"') > 1:  # cheap test first; the slow check only when a key may repeat
        def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                dup = next(k for k in keys if keys.count(k) > 1)
                raise GatewayError(400, f"request body has the key {dup!r} more than once", param=dup,
                                   code="duplicate_key")
            return dict(pairs)
        json.loads(raw, object_pairs_hook=refuse_duplicates)
    return body
