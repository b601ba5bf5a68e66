"""WebSocket mode of /v1/responses, sans-IO: client messages in, HTTP request bodies and events out.

Each `response.create` message becomes one streaming `POST /v1/responses` through Envoy, so
routing, translation, pinning and usage apply per message (the model is only known per message).
The server's messages are the streaming events themselves; failures are `WebSocketErrorEvent`s.

Like OpenAI's WebSocket mode, the socket remembers its most recent response, so a turn with
`store: false` can still be continued by `previous_response_id` on the same socket: the session
sends the remembered conversation in `input` instead (stored turns are continued by the gateway's
own state, on any backend). The connection-local cache follows the Open Responses rules: an unstored
response that is no longer cached (an older one, or one evicted because a turn continuing it failed)
is `previous_response_not_found` at once, as it has no persisted fallback (a continuation refused
by the socket itself fails as any other); a compaction turn is remembered as its compacted window;
and a socket older than the connection limit is told `websocket_connection_limit_reached`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from extproc.config import Limits
from extproc.errors import GatewayError, invalid, upstream_error_payload
from extproc.translate.compact_trigger import window

# Fields a WebSocket `response.create` must not carry (x-openresponses-disallowed in the spec).
# `stream: true` is tolerated, as OpenAI does: Codex CLI sends it over the socket, whose turns always stream.
DISALLOWED = ("stream", "stream_options", "background")
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_UNSTORED_REMEMBERED = 1024  # ids of a socket's unstored responses kept to answer "not found" for them


def error_event(status: int, error: dict[str, Any]) -> str:
    """A WebSocketErrorEvent: the HTTP-style status and the OpenAI error object (code always a string)."""
    err = {**error, "code": str(error.get("code") or error.get("type") or "error"),
           "message": str(error.get("message") or "request failed")}
    return orjson.dumps({"type": "error", "status": status, "error": err}).decode()


def gateway_error_event(e: GatewayError) -> str:
    return error_event(e.status, e.payload())


def upstream_error_event(status: int, body: bytes) -> str:
    """The gateway's (or upstream's) HTTP error answer to one message, as an error event."""
    return error_event(status, upstream_error_payload(status, body))


def _as_items(inp: Any) -> list[Any]:
    """A request's `input` as a list of items, as the client wrote them (a string is one user message)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if isinstance(inp, list):
        return inp
    if inp is None:
        return []
    raise invalid("input", "expected a string or a list of input items")


def connection_limit_reached() -> GatewayError:
    return GatewayError(400, "this WebSocket connection has reached its time limit (limits.websocket_max_seconds); "
                             "open a new connection", code="websocket_connection_limit_reached")


class SocketSession:
    """One client socket: turns its messages into request bodies, remembers its latest response."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 limit_seconds: float = Limits.websocket_max_seconds) -> None:
        self.latest_id: str | None = None  # the most recent completed response on this socket
        self.latest_items: list[dict[str, Any]] = []  # its conversation (input and output items), when unstored
        self._pending_items: list[dict[str, Any]] = []  # the conversation of the turn in flight
        self._unstored: OrderedDict[str, None] = OrderedDict()  # this socket's store: false responses
        self._continuing: str | None = None  # the previous_response_id of the turn in flight
        self._restored: str | None = None  # the same, when the turn was sent from this socket's memory
        self._clock, self._closes_at = clock, clock() + limit_seconds

    def remaining(self) -> float:
        """Seconds until the connection limit: then the socket gets the limit's error event and closes."""
        return self._closes_at - self._clock()

    def request(self, text: str | bytes) -> bytes:
        """The body of the streaming HTTP request for one client message; GatewayError when invalid (a
        continuation refused so is a failed continuation: what it continued is evicted)."""
        if self.remaining() <= 0:
            raise connection_limit_reached()
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise GatewayError(400, f"the message is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(msg, dict) or msg.get("type") != "response.create":
            kind = msg.get("type") if isinstance(msg, dict) else None
            raise GatewayError(400, f"unsupported client event type {kind!r}: expected 'response.create'",
                               param="type", code="unsupported_event")
        try:
            return self._body(msg)
        except GatewayError:
            prev = msg.get("previous_response_id")
            self._continuing = prev if isinstance(prev, str) else None
            self.failed()
            raise

    def _body(self, msg: dict[str, Any]) -> bytes:
        if msg.get("stream") is True:
            del msg["stream"]
        for key in DISALLOWED:
            if key in msg:
                raise GatewayError(400, f"'{key}' must not be sent in a WebSocket response.create message",
                                   param=key, code="unsupported_parameter")
        body = {k: v for k, v in msg.items() if k != "type"}
        prev = body.get("previous_response_id")
        if prev is not None and not isinstance(prev, str):
            raise invalid("previous_response_id", "expected a response id string")
        items = _as_items(body.get("input"))
        self._restored = None
        if prev is not None and prev == self.latest_id and self.latest_items:
            del body["previous_response_id"]
            items = body["input"] = self.latest_items + items
            self._restored = prev
        elif prev in self._unstored:  # unstored and no longer cached: nothing persisted can continue it
            raise GatewayError(400, f"Previous response with id '{prev}' not found.", param="previous_response_id",
                               code="previous_response_not_found")
        self._continuing = prev
        self._pending_items = items if body.get("store") is False else []
        body["stream"] = True
        return orjson.dumps(body)

    def failed(self) -> None:
        """The turn in flight failed (an HTTP error, a broken or failed stream): the response it continued
        is evicted from the socket's cache, so continuing it again is `previous_response_not_found`
        when it was unstored."""
        if self._continuing is not None and self._continuing == self.latest_id:
            self.latest_id, self.latest_items = None, []
        self._continuing = None

    def relayed(self, data: str) -> str:
        """An event as the client gets it: a turn continued from the socket's memory was sent without
        its `previous_response_id`, which its Response still names, as it would over HTTP."""
        if self._restored is None or '"response"' not in data:
            return data
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(doc, dict) or not isinstance(doc.get("response"), dict):
            return data
        doc["response"]["previous_response_id"] = self._restored
        return orjson.dumps(doc).decode()

    def event(self, data: str) -> bool:
        """One streaming event relayed to the client; True when it ended the turn."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind not in TERMINAL:
            return False
        response: dict[str, Any] = doc["response"] if isinstance(doc.get("response"), dict) else {}
        if kind == "response.failed":
            self.failed()
        elif isinstance(response.get("id"), str):
            self.latest_id = response["id"]
            output: list[Any] = response["output"] if isinstance(response.get("output"), list) else []
            # Unstored items have no id the backend knows: they are sent again without one. A compaction
            # turn's conversation is its compacted window (no trigger; before the item, the user messages).
            self.latest_items = window([*self._pending_items, *({k: v for k, v in item.items() if k != "id"}
                                                                for item in output if isinstance(item, dict))]) \
                if self._pending_items else []
            if self._pending_items:
                self._unstored[response["id"]] = None
                while len(self._unstored) > _UNSTORED_REMEMBERED:
                    self._unstored.popitem(last=False)
            self._continuing = None
        return True
