"""One HTTP exchange through the sidecar, as a sans-IO state machine.

The gRPC servicer feeds it Envoy's messages (request headers, request body, response headers,
response body chunks) and turns each returned `Action` into a ProcessingResponse. Nothing here
does I/O, so every decision can be unit-tested with plain dicts and bytes.

Phases Envoy is asked for: request headers and the buffered request body always; response headers
and body only when the response must be translated (`Action.done` ends the exchange early, and
Envoy then passes the rest through untouched).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .classify import CHAT, RESPONSES
from .errors import GatewayError, upstream_error_payload
from .routing import ROUTING_HEADERS, Gateway, Target, placement_key
from .translate import (
    req_chat_to_responses,
    req_responses_to_chat,
    resp_chat_to_responses,
    resp_responses_to_chat,
)
from .translate.common import new_id
from .translate.stream_chat_to_responses import ChatToResponsesStream
from .translate.stream_responses_to_chat import ResponsesToChatStream

log = logging.getLogger("extproc")

API_PATHS = {"/v1/chat/completions": CHAT, "/v1/responses": RESPONSES}
UPSTREAM_PATHS = {CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses"}
BUFFERED, STREAMED = "BUFFERED", "STREAMED"


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def close(self) -> bytes: ...
    def fail(self, code: str, message: str) -> bytes: ...


@dataclass(slots=True)
class Action:
    """What to tell Envoy in reply to one message."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None  # replacement body, None leaves it untouched
    clear_route_cache: bool = False
    immediate: tuple[int, bytes, str] | None = None  # (status, body, content-type): answer without upstream
    response_body_mode: str | None = None  # ask Envoy for the response body: BUFFERED or STREAMED
    done: bool = False  # nothing more to do for this exchange: close the ext_proc stream


def error_action(err: GatewayError) -> Action:
    return Action(immediate=(err.status, err.body(), "application/json"), done=True)


class Exchange:
    def __init__(self, gateway: Gateway):
        self.gw = gateway
        self.headers: dict[str, str] = {}
        self.method = ""
        self.path = ""
        self.client_api: str | None = None
        self.upstream_api: str | None = None
        self.model: str | None = None
        self.target: Target | None = None
        self.request: dict[str, Any] = {}
        self.stream = False
        self.status = 0
        self.encoding: Any = None  # a zlib decompressor when the upstream compressed a translated body
        self.translator: StreamTranslator | None = None

    @property
    def translated(self) -> bool:
        return self.upstream_api is not None and self.upstream_api != self.client_api

    # -- request --------------------------------------------------------------------------------

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Action:
        self.headers = headers
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        self.client_api = API_PATHS.get(self.path.partition("?")[0])
        if not end_of_stream:
            return Action()  # the buffered body comes next; decide there
        if self.method == "GET" and self.path.partition("?")[0] == "/v1/models":
            body = orjson.dumps({"object": "list", "data": self.gw.model_list()})
            return Action(immediate=(200, body, "application/json"), done=True)
        # A body-less request with nothing to route by: the default backend takes it as it is.
        return self._route(Target(self.gw.default_backend, self._default_endpoint()), body=None)

    def _default_endpoint(self) -> str | None:
        b = self.gw.default_backend
        return self.gw.target(b, placement_key({}, self.headers)).endpoint

    def request_body(self, raw: bytes) -> Action:
        limit = self.gw.config.limits.max_body_bytes
        if len(raw) > limit:
            raise GatewayError(413, f"request body of {len(raw)} bytes exceeds the gateway limit of {limit} bytes",
                               code="request_too_large")
        ctype = self.headers.get("content-type", "")
        if self.client_api is None and "json" not in ctype:
            return self._route(Target(self.gw.default_backend, self._default_endpoint()), body=None)
        if self.headers.get("content-encoding", "identity") != "identity":
            raise GatewayError(415, "compressed request bodies are not supported; send the JSON uncompressed",
                               code="unsupported_content_encoding")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise GatewayError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required and must be a non-empty string", param="model",
                               code="invalid_value" if "model" in body else "missing_required_parameter")
        self.model = model
        self.request = body
        res = self.gw.resolve(model)
        if res is None:
            raise GatewayError(404, f"The model '{model}' does not exist or no backend serves it",
                               param="model", code="model_not_found")
        target = self.gw.target(res.backend, placement_key(body, self.headers))
        if self.client_api is None:
            return self._route(target, body=None)
        self.upstream_api = res.upstream_api(self.client_api)
        if self.upstream_api is None:
            path = UPSTREAM_PATHS[res.mode]
            raise GatewayError(400, f"The model '{model}' is only available on {path}, and translation is turned "
                                    f"off for it: call {path} instead", param="model", code="unsupported_api")
        stream = body.get("stream", False)
        self.stream = stream is True
        if not self.translated:
            return self._route(target, body=None)
        if self.client_api == CHAT:
            new = req_chat_to_responses.translate_request(body)
        else:
            if body.get("previous_response_id") is not None:
                raise GatewayError(400, "previous_response_id needs a Responses backend: this model is served "
                                        "on /v1/chat/completions", param="previous_response_id",
                                   code="unsupported_parameter")
            new = req_responses_to_chat.translate_request(
                body, max_tokens_field=res.backend.chat_max_tokens_field)
        return self._route(target, body=orjson.dumps(new))

    def _route(self, target: Target, body: bytes | None) -> Action:
        self.target = target
        path = self.path
        if self.translated:
            path = UPSTREAM_PATHS[self.upstream_api] + ("?" + self.path.partition("?")[2] if "?" in self.path else "")
        headers = target.headers()
        if target.backend.path_prefix:
            path = target.backend.path_prefix + path
        if path != self.path:
            headers.append((":path", path))
        remove = tuple(h for h in ROUTING_HEADERS if h not in {k for k, _ in headers})
        if body is not None:
            headers.append(("content-length", str(len(body))))
            headers.append(("accept-encoding", "identity"))  # translated answers must arrive readable
        return Action(set_headers=headers, remove_headers=remove, body=body, clear_route_cache=True,
                      done=not self.translated)

    # -- response -------------------------------------------------------------------------------

    def response_headers(self, headers: dict[str, str]) -> Action:
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 502
        remove: tuple[str, ...] = ("content-length",)
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            self.encoding = zlib.decompressobj(wbits=47)  # gzip or zlib header, auto-detected
            remove += ("content-encoding",)
        elif encoding != "identity":
            self.encoding = encoding  # undecodable: answered as an error once the body arrives
            remove += ("content-encoding",)
        sse = headers.get("content-type", "").startswith("text/event-stream")
        if self.stream and self.status == 200 and sse and not isinstance(self.encoding, str):
            self.translator = (ResponsesToChatStream(self.request, self.model or "")
                               if self.client_api == CHAT else ChatToResponsesStream(self.request))
            return Action(set_headers=[("content-type", "text/event-stream; charset=utf-8")],
                          remove_headers=remove, response_body_mode=STREAMED)
        return Action(set_headers=[("content-type", "application/json")], remove_headers=remove,
                      response_body_mode=BUFFERED)

    def _decode(self, chunk: bytes, end: bool) -> bytes:
        if self.encoding is None:
            return chunk
        if isinstance(self.encoding, str):
            raise GatewayError(502, f"the upstream answered with content-encoding {self.encoding!r}, "
                                    "which the sidecar cannot translate", code="upstream_encoding")
        try:
            out = self.encoding.decompress(chunk)
            return out + self.encoding.flush() if end else out
        except zlib.error as e:
            raise GatewayError(502, f"the upstream sent a corrupt compressed body: {e}", code="upstream_encoding") from None

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        if self.translator is not None:
            try:
                data = self._decode(chunk, end_of_stream)
            except GatewayError as e:
                return Action(body=self.translator.fail(e.code or "upstream_error", e.message), done=True)
            out = self.translator.feed(data)
            if end_of_stream:
                out += self.translator.close()
            return Action(body=out, done=end_of_stream)
        body = self._translate_buffered(self._decode(chunk, end_of_stream))
        return Action(body=body, set_headers=[("content-length", str(len(body)))], done=True)

    def _translate_buffered(self, data: bytes) -> bytes:
        doc: Any = None
        if 200 <= self.status < 300:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                doc = None
        if not isinstance(doc, dict):
            if 200 <= self.status < 300:
                raise GatewayError(502, "the upstream returned a response that is not JSON",
                                   code="bad_upstream_response")
            return orjson.dumps({"error": upstream_error_payload(self.status, data)})
        if self.client_api == CHAT:
            return orjson.dumps(resp_responses_to_chat.translate_response(doc, self.model or ""))
        return orjson.dumps(resp_chat_to_responses.translate_response(doc, self.request, new_id("resp_")))
