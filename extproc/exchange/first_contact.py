"""First contact with a model of unknown API, from the upstream side: a rejection becomes a retry (sans-IO).

A request to a model whose API nobody has said (a backend declared `auto` or `both`) is sent on the
client's API, marked `x-gateway-first-contact` (its value: the caller's tenant), and Envoy routes it
to the `endpoints_first_contact` cluster, whose upstream filter is this processor again (gRPC metadata
`x-extproc-role: first-contact`), once per attempt (`x-envoy-attempt-count`):

- `Probe` (attempt 1) passes the request on untouched and reads the answer only when it is a
  400/404/405/422. When the rejection says the model needs the other API (`rejection_needs`: never
  auth, rate-limit or content errors), it records the learned fact as any rejection does, keeps the
  upstream's message, and marks the answer `x-gateway-retry`: Envoy's retry policy drops it (no byte
  reaches the client) and sends the request again.
- `Retry` (attempt 2) is an ordinary `Exchange` on the same request, which now resolves to the other
  API from the learned fact and is translated both ways, streaming or not. Its answer carries
  `x-gateway-retried-as: <api>`, so the client-side exchange reads it as an answer in the client's
  API; when it fails too, its error names both upstream messages.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from extproc.api import API_OF_PATH, PATHS
from extproc.errors import GatewayError, upstream_error_payload
from extproc.exchange.actions import BUFFERED, Action, Step, new_body
from extproc.exchange.exchange import Exchange
from extproc.exchange.plan import ModelFacts
from extproc.routing.gateway import H_BACKEND, H_FIRST_CONTACT, H_RETRIED, H_RETRY, ROUTING_HEADERS, Gateway
from extproc.routing.modes import rejection_needs
from extproc.state.lookup import Lookup, Values, then

log = logging.getLogger("extproc")

ROLE = "first-contact"  # gRPC metadata x-extproc-role of the upstream filter's streams
_LEARNABLE = (400, 404, 405, 422)


def first_attempt_key(request_id: str) -> str:
    """Envoy's request id, the same for both attempts (Envoy makes its own for outside clients)."""
    return f"first:{request_id}"


def _client_path(gw: Gateway, headers: dict[str, str]) -> dict[str, str]:
    """The request as the client sent it: the backend's path prefix taken off again."""
    backend = gw.config.backend(headers.get(H_BACKEND, ""))
    path = headers.get(":path", "")
    if backend is not None and backend.path_prefix and path.startswith(backend.path_prefix):
        return {**headers, ":path": path[len(backend.path_prefix):]}
    return headers


class Probe:
    """Attempt 1: sent as it is; a rejection naming the other API turns into Envoy's retry."""

    def __init__(self, gw: Gateway, headers: dict[str, str]):
        self.gw = gw
        self.headers = _client_path(gw, headers)
        self.tenant = headers.get(H_FIRST_CONTACT, "")
        self.status = 0
        self.model: str | None = None

    def request_body(self, raw: bytes) -> Action:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        self.model = model if isinstance(model, str) else None
        return Action()

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        status = headers.get(":status", "")
        self.status = int(status) if status.isdigit() else 0
        if self.status in _LEARNABLE and self.model is not None:
            return Action(response_body_mode=BUFFERED)
        return Action(done=True)

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        client_api = API_OF_PATH.get(self.headers.get(":path", "").partition("?")[0])
        backend = self.headers.get(H_BACKEND, "")
        needs = rejection_needs(self.status, chunk, client_api) if client_api else None
        if needs is None or self.model is None:
            return Action(done=True)  # any other error goes to the client untouched
        log.info("model=%s backend=%s: first contact rejected on %s, retrying on the %s API", self.model, backend,
                 client_api, needs)
        facts = ModelFacts(self.gw, backend, self.model, client_api or "",
                           self.gw.knowledge.learned(backend, self.model, self.gw.clock()))
        message = upstream_error_payload(self.status, chunk).get("message") or ""
        # The retry's headers are this attempt's as changed here (the mark is gone): it reads these.
        first = (first_attempt_key(self.headers.get("x-request-id", "")),
                 orjson.dumps({"api": client_api, "status": self.status, "message": message, "tenant": self.tenant}))
        return Action(set_headers=[(H_RETRY, needs)], writes=[*facts.needs(needs), first], write_ttl=facts.ttl,
                      done=True)


class Retry:
    """Attempt 2: the request through an ordinary exchange (now translated), its failure explained."""

    def __init__(self, gw: Gateway, headers: dict[str, str]):
        self.ex = Exchange(gw)
        self.headers = _client_path(gw, headers)
        self.first: dict[str, Any] = {}

    @property
    def model(self) -> str | None:
        return self.ex.model

    def request_headers(self, end_of_stream: bool) -> Step:
        key = first_attempt_key(self.headers.get("x-request-id", ""))
        return Lookup((key,), lambda values: self._start(values, end_of_stream))

    def _start(self, values: Values, end_of_stream: bool) -> Step:
        try:
            first = orjson.loads(values[0]) if values and values[0] else {}
        except orjson.JSONDecodeError:
            first = {}
        self.first = first if isinstance(first, dict) else {}
        step = self.ex.request_headers(self.headers, end_of_stream)
        if isinstance(self.first.get("tenant"), str):  # the caller's: the request carries the backend's key now
            self.ex.req.pinning.tenant = self.first["tenant"]
        return then(step, _in_upstream)

    def request_body(self, raw: bytes) -> Step:
        return then(self.ex.request_body(raw), _in_upstream)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        act = self.ex.response_headers(headers, end_of_stream)
        if self.ex.translated:
            act.set_headers.append((H_RETRIED, self.ex.upstream_api or ""))
        return act

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        act = self.ex.response_body(chunk, end_of_stream)
        if 200 <= self.ex.status < 300 or act.body is None or not end_of_stream:
            return act
        second = upstream_error_payload(self.ex.status, act.body)
        tried = PATHS.get(self.first.get("api", ""), "the client's API")
        message = (f"The model '{self.ex.model}' was tried on both APIs. {tried} answered "
                   f"{self.first.get('status', '?')}: {self.first.get('message') or 'rejected'}; "
                   f"{PATHS.get(self.ex.upstream_api or '', 'the other API')} answered {self.ex.status}: "
                   f"{second.get('message')}")
        return new_body(orjson.dumps({"error": {**second, "message": message}}), writes=act.writes)


def _in_upstream(act: Action) -> Action:
    """The route is chosen already: re-matching it means nothing to an upstream filter."""
    act.clear_route_cache = False
    act.set_headers = [(k, v) for k, v in act.set_headers if k not in ROUTING_HEADERS]  # and no backend needs them
    act.remove_headers = (*act.remove_headers, *ROUTING_HEADERS)
    return act


class FirstContact:
    """One upstream-filter stream, an attempt of a first-contact request; the shell drives it like an
    `Exchange` (no metrics or access-log metadata of its own: the client-side exchange reports it)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.attempt: Probe | Retry | None = None
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        strip = Action(remove_headers=(H_FIRST_CONTACT,))
        if int(headers.get("x-envoy-attempt-count", "1") or 1) <= 1:
            self.attempt = Probe(self.gw, headers)
            return strip
        self.attempt = Retry(self.gw, headers)
        return then(self.attempt.request_headers(end_of_stream), _without_marker)

    def request_body(self, raw: bytes) -> Step:
        assert self.attempt is not None
        return self.attempt.request_body(raw)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        assert self.attempt is not None
        return self.attempt.response_headers(headers, end_of_stream)

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        assert self.attempt is not None
        return self.attempt.response_body(chunk, end_of_stream)

    def metadata(self) -> None:
        return None

    @property
    def headers(self) -> dict[str, str]:
        return self.attempt.headers if self.attempt is not None else {}

    @property
    def method(self) -> str:
        return self.headers.get(":method", "")

    @property
    def path(self) -> str:
        return self.headers.get(":path", "")

    @property
    def model(self) -> str | None:
        return self.attempt.model if self.attempt is not None else None


def _without_marker(act: Action) -> Action:
    act.remove_headers = (*act.remove_headers, H_FIRST_CONTACT)  # never sent to the backend
    return act
