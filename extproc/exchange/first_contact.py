"""First contact with a model of unknown API, both sides of it: a rejection becomes a retry (sans-IO).

A request to a model whose API nobody has said (a backend declared `auto` or `both`: `Need.LEARN`)
is sent on the client's API, marked `x-gateway-first-contact` by the client-side exchange (`mark`,
its value the caller's tenant), and Envoy routes it to the `endpoints_first_contact` cluster, whose
upstream filter is this processor again (gRPC metadata `x-extproc-role: first-contact`), once per
attempt (`x-envoy-attempt-count`):

- `Probe` (attempt 1) passes the request on untouched but for the gateway's headers, and reads the answer only when it is a
  400/404/405/422. When the rejection says the model needs the other API (`rejection_needs`: never
  auth, rate-limit or content errors), it records the learned fact as any rejection does, keeps the
  upstream's message, and marks the answer `x-gateway-retry`: Envoy's retry policy drops it (no byte
  reaches the client) and sends the request again.
- `Retry` (attempt 2) is an ordinary `Exchange` on the same request, which now resolves to the other
  API from the learned fact and is translated both ways, streaming or not.
- A `/v1/responses/compact` to a Responses model (`Need.COMPACT_FALLBACK`) that the backend answers
  404 about the path (some OpenAI accounts) is retried the same way: attempt 1 records that the backend
  lacks the endpoint for the model, and attempt 2's exchange sends the same compaction as a
  `compaction_trigger` turn (`translate/compact_trigger.CompactAsTurn`). Its answer carries
  `x-gateway-retried-as: <api>`, so the client-side exchange reads it as an answer in the client's
  API (`retried_as`); when it fails too, its error names both upstream messages.

The shell picks `FirstContact` for a stream of the upstream filter; its attempts keep their phases by
the exchange's table (`phases`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import orjson

from extproc.api import API_OF_PATH, COMPACT_PATH, PATHS, RESPONSES
from extproc.envoy.names import (
    H_BACKEND,
    H_FIRST_CONTACT,
    H_RETRIED,
    H_RETRY,
    LEARNABLE_STATUSES,
    ROUTING_HEADERS,
)
from extproc.errors import GatewayError, upstream_error_payload
from extproc.exchange.actions import BUFFERED, Action, Step, Writes, new_body
from extproc.exchange.phases import Lifecycle
from extproc.exchange.plan import ModelFacts, Plan
from extproc.exchange.upstream import UpstreamStream
from extproc.routing.gateway import Gateway
from extproc.routing.hosted import first_contact_ready
from extproc.routing.modes import compact_missing, rejection_needs
from extproc.routing.needs import Need, retried_by_envoy
from extproc.state.lookup import Decision, Reads, awaited, start

if TYPE_CHECKING:
    from extproc.exchange.exchange import Exchange

log = logging.getLogger("extproc")


# -- the client-side exchange's part ----------------------------------------------------------------

def mark(plan: Plan) -> list[tuple[str, str]]:
    """The request header that sends a request to the first-contact cluster, where Envoy may retry it
    (on the other API, or a compact as a compaction_trigger turn), sent to one instance or to a `url:`
    backend's first-contact twin cluster."""
    if retried_by_envoy(plan.needs) and first_contact_ready(plan.target):
        return [(H_FIRST_CONTACT, plan.pinning.tenant)]
    return []


def retried_as(plan: Plan, headers: dict[str, str]) -> str | None:
    """The API the upstream side retried a first contact on, and translated its answer from (it
    recorded what it learned, and the turn)."""
    return headers.get(H_RETRIED) if Need.LEARN in plan.needs else None


# -- the upstream filter's attempts -----------------------------------------------------------------

def first_attempt_key(request_id: str) -> str:
    """Envoy's request id, the same for both attempts (Envoy makes its own for outside clients)."""
    return f"first:{request_id}"


_RETRIED_PATHS = (*API_OF_PATH, COMPACT_PATH)  # the client paths a first contact is made on


def _client_path(gw: Gateway, headers: dict[str, str], backend_name: str) -> dict[str, str]:
    """The request as the client sent it: the backend's path prefix taken off again. Without the backend
    (a record from an older replica, or one whose write failed), the configured prefix under which the
    rest is a retried path: no two prefixes fit one path, since no retried path ends with another."""
    backend = gw.config.backend(backend_name)
    path = headers.get(":path", "")
    for prefix in {b.path_prefix for b in ((backend,) if backend is not None else gw.config.backends)} - {""}:
        if path.startswith(prefix) and path[len(prefix):].partition("?")[0] in _RETRIED_PATHS:
            return {**headers, ":path": path[len(prefix):]}
    return headers


class Probe:
    """Attempt 1: sent as it is, without the gateway's headers; a rejection naming the other API turns
    into Envoy's retry."""

    def __init__(self, gw: Gateway, headers: dict[str, str]):
        self.gw = gw
        self.headers = _client_path(gw, headers, headers.get(H_BACKEND, ""))
        self.tenant = headers.get(H_FIRST_CONTACT, "")
        self.life = Lifecycle()
        self.status = 0
        self.model: str | None = None

    def request_headers(self, end_of_stream: bool) -> Step:
        self.life.enter("request_headers")
        # Envoy's retry picks its instance from the endpoint as dynamic metadata (deploy/envoy.yaml), not
        # from the header: these changes are the retry's too, which learns the backend from the record.
        return self.life.move("request_headers", Action(remove_headers=(H_FIRST_CONTACT, *ROUTING_HEADERS)))

    def request_body(self, raw: bytes) -> Step:
        self.life.enter("request_body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        self.model = model if isinstance(model, str) else None
        return self.life.move("request_body", Action())

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        self.life.enter("response_headers")
        status = headers.get(":status", "")
        self.status = int(status) if status.isdigit() else 0
        if self.status in LEARNABLE_STATUSES and self.model is not None:
            return self.life.move("response_headers", Action(response_body_mode=BUFFERED))
        return self.life.move("response_headers", Action(done=True))

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        self.life.enter("response_body")
        return self.life.move("response_body", self._retry_or_not(chunk))

    def _retry_or_not(self, chunk: bytes) -> Action:
        path = self.headers.get(":path", "").partition("?")[0]
        if path == COMPACT_PATH:
            return self._compact_or_not(chunk)
        client_api = API_OF_PATH.get(path)
        needs = rejection_needs(self.status, chunk, client_api) if client_api else None
        if needs is None or self.model is None:
            return Action(done=True)  # any other error goes to the client untouched
        log.info("model=%s backend=%s: first contact rejected on %s, retrying on the %s API", self.model,
                 self.headers.get(H_BACKEND, ""), client_api, needs)
        facts = self._facts(client_api or "")
        return self._retry(needs, facts.needs(needs), {"api": client_api or ""}, chunk, facts.ttl)

    def _compact_or_not(self, chunk: bytes) -> Action:
        """A compact answered 404 about the path: the backend lacks the endpoint for this model, learned,
        and the retry asks the same compaction as a compaction_trigger turn."""
        if self.model is None or not compact_missing(self.status, chunk):
            return Action(done=True)
        log.info("model=%s backend=%s: %s answered 404, retrying as a compaction_trigger turn", self.model,
                 self.headers.get(H_BACKEND, ""), COMPACT_PATH)
        facts = self._facts(RESPONSES)
        return self._retry(RESPONSES, facts.lacks(COMPACT_PATH), {"api": RESPONSES, "path": COMPACT_PATH}, chunk,
                           facts.ttl)

    def _facts(self, client_api: str) -> ModelFacts:
        assert self.model is not None
        backend = self.headers.get(H_BACKEND, "")
        return ModelFacts(self.gw, backend, self.model, client_api,
                          self.gw.knowledge.learned(backend, self.model, self.gw.clock()))

    def _retry(self, api: str, learned: Writes, tried: dict[str, str], chunk: bytes, ttl: int) -> Action:
        """Envoy's retry of this request, what was learned written first, with the rejection's note."""
        message = upstream_error_payload(self.status, chunk).get("message") or ""
        # The retry's headers are this attempt's as changed here (the mark is gone): it reads these.
        first = (first_attempt_key(self.headers.get("x-request-id", "")),
                 orjson.dumps({**tried, "status": self.status, "message": message, "tenant": self.tenant,
                               "backend": self.headers.get(H_BACKEND, "")}))
        return Action(set_headers=[(H_RETRY, api)], writes=[*learned, first], write_ttl=ttl, done=True)


class Retry:
    """Attempt 2: the request through an ordinary exchange (now translated) for the caller's tenant
    recorded by attempt 1, its failure explained."""

    def __init__(self, gw: Gateway, headers: dict[str, str]):
        self.gw = gw
        self.headers = headers  # the client's path once attempt 1's record is read
        self.first: dict[str, Any] = {}
        self.ex: Exchange | None = None  # made once attempt 1's record is read

    @property
    def model(self) -> str | None:
        return self.ex.model if self.ex is not None else None

    def request_headers(self, end_of_stream: bool) -> Step:
        return start(self._start(end_of_stream))

    def _start(self, end_of_stream: bool) -> Decision[Action]:
        values = yield Reads((first_attempt_key(self.headers.get("x-request-id", "")),))
        try:
            first = orjson.loads(values[0]) if values and values[0] else {}
        except orjson.JSONDecodeError:
            first = {}
        self.first = first if isinstance(first, dict) else {}
        backend = self.first.get("backend")
        self.headers = _client_path(self.gw, self.headers, backend if isinstance(backend, str) else "")
        tenant = self.first.get("tenant")  # the caller's: the request carries the backend's key now
        from extproc.exchange.exchange import Exchange  # here: the exchange imports this module's client side

        self.ex = Exchange(self.gw, tenant if isinstance(tenant, str) else None)
        act = yield from awaited(self.ex.request_headers(self.headers, end_of_stream))
        return _in_upstream(act, remove=(*act.remove_headers, H_FIRST_CONTACT))  # never sent to the backend

    def request_body(self, raw: bytes) -> Step:
        assert self.ex is not None
        return start(_in_upstream_after(self.ex.request_body(raw)))

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        assert self.ex is not None
        act = self.ex.answer_headers(headers, end_of_stream)
        if self.ex.translated:
            act.set_headers.append((H_RETRIED, self.ex.upstream_api or ""))
        return act

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        ex = self.ex
        assert ex is not None
        act = ex.response_body(chunk, end_of_stream)
        if 200 <= ex.status < 300 or act.body is None or not end_of_stream:
            return act
        second = upstream_error_payload(ex.status, act.body)
        path = self.first.get("path")  # a compact's endpoint, retried as a turn
        tried = path if isinstance(path, str) else PATHS.get(self.first.get("api", ""), "the client's API")
        both = "both APIs" if path is None else "both forms of compaction"
        message = (f"The model '{ex.model}' was tried on {both}. {tried} answered "
                   f"{self.first.get('status', '?')}: {self.first.get('message') or 'rejected'}; "
                   f"{PATHS.get(ex.upstream_api or '', 'the other API')} answered {ex.status}: "
                   f"{second.get('message')}")
        return new_body(orjson.dumps({"error": {**second, "message": message}}), writes=act.writes)


def _in_upstream(act: Action, remove: tuple[str, ...] | None = None) -> Action:
    """The route is chosen already: re-matching it means nothing to an upstream filter."""
    removed = act.remove_headers if remove is None else remove
    return dataclasses.replace(act, clear_route_cache=False,  # and no backend needs the routing headers
                               set_headers=[(k, v) for k, v in act.set_headers if k not in ROUTING_HEADERS],
                               remove_headers=(*removed, *ROUTING_HEADERS))


def _in_upstream_after(step: Step) -> Decision[Action]:
    return _in_upstream((yield from awaited(step)))


class FirstContact(UpstreamStream):
    """One upstream-filter stream, an attempt of a first-contact request; the shell drives it like an
    `Exchange` (no metrics or access-log metadata of its own: the client-side exchange reports it).
    Each attempt keeps its phases by the exchange's table."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.attempt: Probe | Retry | None = None
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        if self.attempt is not None:
            raise RuntimeError("Envoy sent request_headers twice")
        first = int(headers.get("x-envoy-attempt-count", "1") or 1) <= 1
        self.attempt = Probe(self.gw, headers) if first else Retry(self.gw, headers)
        return self.attempt.request_headers(end_of_stream)

    def _current(self, kind: str) -> Probe | Retry:
        if self.attempt is None:
            raise RuntimeError(f"Envoy sent {kind} before request_headers")
        return self.attempt

    def request_body(self, raw: bytes) -> Step:
        return self._current("request_body").request_body(raw)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        return self._current("response_headers").response_headers(headers, end_of_stream)

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        return self._current("response_body").response_body(chunk, end_of_stream)

    @property
    def headers(self) -> dict[str, str]:
        return self.attempt.headers if self.attempt is not None else {}

    @property
    def model(self) -> str | None:
        return self.attempt.model if self.attempt is not None else None
