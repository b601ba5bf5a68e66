"""Errors in the client's API shape: the OpenAI one both OpenAI APIs share, {"error": {message, type, param,
code}}, and Anthropic's, {"type": "error", "error": {type, message}}, for Messages clients."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.api import MESSAGES, PATHS

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}

# Anthropic's error types by status (its SDKs pick the exception class by status, the type says why).
# One table for the sidecar's answers and Envoy's own (deploy/envoy.yaml's local replies, made from it by
# extproc/envoy/names.py), so a status gets one type whichever path the request took. A 503, whether an
# upstream says it (OpenAI's "engine is currently overloaded") or Envoy does (an upstream unreachable or
# reset, the sidecar down), is HTTP's "temporarily unable to handle the request, retry after a delay"
# (RFC 9110 15.6.4): Anthropic's overloaded_error ("temporarily overloaded", its 529), not api_error
# ("an unexpected error internal to the API"). A 504 is its timeout_error (the SDKs' GatewayTimeoutError).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_doc(api: str | None, status: int, payload: dict[str, Any]) -> dict[str, Any]:
    """An error object (`payload` in the OpenAI shape) as the client's API writes errors."""
    if api == MESSAGES:
        return {"type": "error", "error": {"type": anthropic_type(status), "message": payload["message"]}}
    return {"error": payload}


class GatewayError(Exception):
    """A request the sidecar answers itself, with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers  # extra response headers (`allow` on a 405)

    def payload(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self, api: str | None = None) -> bytes:
        """The error in the shape of the client's API (None: the OpenAI shape)."""
        return orjson.dumps(error_doc(api, self.status, self.payload()))


class BadUpstream(GatewayError):
    """An upstream answer without the shape the translator needs: the upstream's fault (502), named by
    the JSON path of the field, so the operator can see which backend sends what."""

    def __init__(self, field: str, problem: str):
        super().__init__(502, f"the upstream's answer cannot be translated: '{field}' {problem}",
                         code="bad_upstream_response")
        self.field = field


def bad_upstream(why: str) -> GatewayError:
    return GatewayError(502, f"the upstream returned a response the gateway cannot use: {why}",
                        code="bad_upstream_response")


def usable_status(status: int) -> bool:
    """A status a translated answer can keep: a success, or an error the client's SDK raises. Any other
    (1xx, 3xx such as a 304 that may not carry a body, 600 and up) becomes a 502."""
    return 200 <= status < 300 or 400 <= status < 600


def empty_answer(status: int) -> GatewayError:
    """A translated request's answer with no body at all: a success is the upstream's fault (502), an
    error keeps its status, in the OpenAI shape."""
    if not usable_status(status):
        return bad_upstream(f"status {status}")
    if status < 300:
        return BadUpstream("body", "is empty")
    payload = upstream_error_payload(status, b"")
    return GatewayError(status, payload["message"], type=payload["type"])


def unsupported(field: str, target_api: str, why: str = "it has no equivalent") -> GatewayError:
    api = PATHS[target_api]
    return GatewayError(400, f"'{field}' cannot be translated to {api} for this model: {why}",
                        param=field, code="unsupported_parameter")


def invalid(field: str, message: str) -> GatewayError:
    return GatewayError(400, f"Invalid '{field}': {message}", param=field, code="invalid_value")


def upstream_error_payload(status: int, body: bytes) -> dict[str, Any]:
    """Normalise an upstream error body (OpenAI, vLLM, Ollama, plain text) to the OpenAI error object."""
    message: str | None = None
    err: Any = None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, str):  # {"error": "text"} (Ollama and others)
            message, err = err, {}
        elif isinstance(err, dict):
            message = err.get("message") if isinstance(err.get("message"), str) else None
        else:
            err = {}
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text[:2000] or f"upstream returned HTTP {status}"
        err = err if isinstance(err, dict) else {}
    code = err.get("code")
    return {
        "message": message,
        "type": err.get("type") if isinstance(err.get("type"), str) else
        _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": err.get("param") if isinstance(err.get("param"), str) else None,
        "code": code if isinstance(code, str) else str(code) if isinstance(code, (int, float)) else None,
    }
