"""`previous_response_id` and `/v1/responses/{id}`: every decision about conversation state (sans-IO).

- Continuing (`previous_response_id`): a turn the sidecar holds (chat-only backends) is rebuilt into
  the new request's input; a pin sends the request to the instance that produced the response; with
  neither, the ring places it by the id.
- Resources (`GET`/`DELETE`/`cancel`/`input_items`): answered from a held turn, else sent where the pin
  says the response lives.
- Recording: the id of every stored Responses answer is pinned to its instance (`IdRecorder`); every
  translated Response is kept as a turn (`turn_writes`).

Records are per tenant (`records.pin_key`/`turn_key`), and every id's owner is recorded beside them
(`records.owner_key`): an id recorded for another tenant gets the unknown id's 404 without reaching
an upstream. An id the sidecar never recorded is sent on (placed by the ring) only to a backend
declared to check each caller's own key (`authenticates_callers`); anywhere else it is refused, since
such a backend would serve whoever names the id. The decisions are straight-line generators that
yield their store reads (`state.lookup`); their names are `PinDecision`, counted in metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from extproc.config import Backend
from extproc.errors import GatewayError
from extproc.routing.classify import Resolution
from extproc.routing.gateway import Gateway, Target
from extproc.state import background
from extproc.state import records as rec
from extproc.state.lookup import Decision, Reads
from extproc.translate.sse import SSEDecoder

log = logging.getLogger("extproc")

_STREAM_LIMIT = 64 * 1024  # a stream whose response.created is not in its first 64 KiB is not pinned
_BODY_LIMIT = 16 * 1024 * 1024  # a Response body larger than this is not pinned
_MAX_ID = 200
Writes = list[tuple[str, bytes | None]]
PinWrites = Callable[[str, str, rec.Pin], Writes]  # (tenant, id, pin): the records an id's pin is kept as


class PinDecision(StrEnum):
    PIN_HIT = "pin_hit"  # routed to the instance recorded for the id
    PIN_FALLBACK = "pin_fallback"  # no record (or no store): placed by the ring on the id
    PIN_GONE = "pin_gone"  # the recorded instance is no longer configured
    TURN_HIT = "turn_hit"  # a conversation the sidecar holds, rebuilt or answered from
    TURN_MISS = "turn_miss"  # a chat-only backend and no held turn: unknown id
    STATE_UNAVAILABLE = "state_unavailable"  # the store did not answer where only it could
    UNKNOWN_ID = "unknown_id"  # no record in this tenant, and the backend cannot tell tenants apart
    OTHER_TENANT = "other_tenant"  # recorded for another tenant: answered as an unknown id


def tells_callers_apart(backend: Backend) -> bool:
    """Whether the backend itself checks whose a response is: declared to authenticate each caller by
    the caller's own key, and sent no key of the sidecar's (with one, every tenant looks the same to
    it). Only such a backend may be sent an id the sidecar holds no record of; any other (a vLLM or
    Ollama server, or one holding the gateway's key) would serve whoever names the id."""
    return backend.authenticates_callers and backend.api_key_env is None


def check_item_references(backend: Backend, inp: Any) -> None:
    """An `item_reference` names an item the backend stored; the sidecar records no owner of item ids, so
    only a backend that checks each caller itself may resolve one. Elsewhere it could hand one tenant
    another's stored item: refused, naming the item."""
    if tells_callers_apart(backend) or not isinstance(inp, list):
        return
    for i, item in enumerate(inp):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            raise GatewayError(400, f"Backend '{backend.name}' cannot tell callers apart, so the gateway cannot check "
                                    "whose stored item this references: send the item itself (or continue with "
                                    "previous_response_id)", param=f"input[{i}]", code="invalid_value")


def _state_keys(tenant: str, response_id: str) -> tuple[str, str, str]:
    """What says where an id lives and whose it is: one multi-get."""
    return rec.turn_key(tenant, response_id), rec.pin_key(tenant, response_id), rec.owner_key(response_id)


@dataclass(slots=True)
class Continuation:
    """Where a `previous_response_id` request goes, and what it carries."""

    target: Target
    decision: PinDecision | None = None  # None: a first turn, nothing to continue
    prior: list[dict[str, Any]] = field(default_factory=list)  # held turns, oldest first, to merge into input
    ancestors: list[str] = field(default_factory=list)  # ids of the chain, for the turn this request makes
    pinned_id: str | None = None  # routed by a pin: a lost instance is explained, not passed on


@dataclass(slots=True)
class Answered:
    """A resource request the sidecar answers itself, from a held turn."""

    status: int
    body: bytes
    writes: Writes = field(default_factory=list)


@dataclass(slots=True)
class Forwarded:
    """A resource request sent where its response lives."""

    target: Target
    decision: PinDecision
    pinned_id: str | None


def state_unavailable() -> GatewayError:
    return GatewayError(503, "the conversation store is unavailable; retry shortly", code="state_unavailable")


class Pinning:
    """The state decisions of one request: its tenant, its gateway, what it decided."""

    def __init__(self, gw: Gateway, headers: dict[str, str], tenant: str | None = None):
        self.gw = gw
        self.headers = headers
        self._tenant = tenant  # given: the caller's, when the request itself carries the backend's key
        self.decision: PinDecision | None = None
        self.background_outcome: str | None = None  # a background run this request recorded as ended (lost)
        self._state: tuple[str, list[bytes | None] | None] | None = None  # (id, its state_of) once read

    @property
    def tenant(self) -> str:
        """Computed only for requests that touch state (an HMAC per request otherwise)."""
        if self._tenant is None:
            self._tenant = self.gw.tenants.tenant_of(self.headers)
        return self._tenant

    def _decide(self, decision: PinDecision) -> PinDecision:
        self.decision = decision
        return decision

    # -- previous_response_id -----------------------------------------------------------------

    def state_of(self, response_id: str) -> Decision[list[bytes | None] | None]:
        """The id's turn, pin and owner (None: the store is unavailable), read once per request: the
        group hand-over and the continuation both need them."""
        if self._state is None or self._state[0] != response_id:
            values = yield Reads(_state_keys(self.tenant, response_id))
            self._state = (response_id, values)
        return self._state[1]

    def continue_from(self, prev: str, model: str, res: Resolution, target: Target,
                      translated: bool) -> Decision[Continuation]:
        values = yield from self.state_of(prev)
        if values is None:
            if translated or not tells_callers_apart(res.backend):  # only the store can say whose it is
                self._decide(PinDecision.STATE_UNAVAILABLE)
                raise state_unavailable()
            log.warning("previous_response_id %s: store unavailable, routing by ring", prev)
            return Continuation(self.gw.target(res.backend, prev), self._decide(PinDecision.PIN_FALLBACK))
        turn, pin = rec.load_turn(values[0]), rec.Pin.loads(values[1]) if values[1] else None
        if turn is not None:
            held = yield from self._held_before(turn)
            endpoint = turn.get("endpoint")  # same instance as before when it is still there: its prefix cache
            if translated and endpoint in {e.address for e in res.backend.endpoints}:
                target = Target(res.backend, endpoint)
            return Continuation(target, self._decide(PinDecision.TURN_HIT), rec.history([*held, turn]),
                                rec.chain(turn, prev))
        if pin is not None:
            if translated:
                self.configured(prev, pin)  # one no longer configured is gone, whoever serves the model now
                raise GatewayError(400, f"Previous response '{prev}' is held by backend '{pin.backend}', but model "
                                        f"'{model}' is served by chat-only backend '{res.backend.name}', which "
                                        "cannot continue it", param="previous_response_id",
                                   code="previous_response_not_found")
            return Continuation(self.pinned_target(prev, pin), PinDecision.PIN_HIT, pinned_id=prev)
        if self._owned_elsewhere(values):
            raise rec.previous_not_found(prev)
        if translated or not tells_callers_apart(res.backend):
            self._decide(PinDecision.TURN_MISS if translated else PinDecision.UNKNOWN_ID)
            raise rec.previous_not_found(prev)
        log.info("previous_response_id %s: no pin recorded, routing by ring", prev)
        return Continuation(self.gw.target(res.backend, prev), self._decide(PinDecision.PIN_FALLBACK))

    def _held_before(self, turn: dict[str, Any]) -> Decision[list[dict[str, Any]]]:
        """The held turns a turn continues, oldest first, all read at once; one expired breaks the chain."""
        ancestors: list[str] = turn.get("ancestors") or []
        if not ancestors:
            return []
        values = yield Reads(tuple(rec.turn_key(self.tenant, a) for a in ancestors))
        if values is None:
            self._decide(PinDecision.STATE_UNAVAILABLE)
            raise state_unavailable()
        turns = [rec.load_turn(v) for v in values]
        for aid, t in zip(ancestors, turns, strict=True):
            if t is None:
                raise GatewayError(404, f"An earlier response in this conversation ('{aid}') has expired or was "
                                        "deleted, so it cannot be continued", param="previous_response_id",
                                   code="previous_response_not_found")
        return [t for t in turns if t is not None]

    def _owned_elsewhere(self, values: list[bytes | None]) -> bool:
        """The id is recorded for another tenant (no turn or pin of the caller's names it)."""
        owner = values[2]
        if owner is None or owner.decode() == self.tenant:
            return False
        self._decide(PinDecision.OTHER_TENANT)
        return True

    def pinned_target(self, pinned_id: str, pin: rec.Pin, noun: str = "Response",
                      param: str | None = "previous_response_id") -> Target:
        """The instance a pin names (a response's, or with `noun` a conversation's), still configured."""
        backend = self.configured(pinned_id, pin, noun, param)
        self._decide(PinDecision.PIN_HIT)
        return Target(backend, pin.endpoint)

    def configured(self, pinned_id: str, pin: rec.Pin, noun: str = "Response",
                   param: str | None = "previous_response_id") -> Backend:
        """The backend a pin names, with the instance it names; else 409 `pinned_backend_gone`."""
        backend = self.gw.config.backend(pin.backend)
        if backend is None or (pin.endpoint is not None and pin.endpoint not in {e.address for e in backend.endpoints}):
            self._decide(PinDecision.PIN_GONE)
            where = f"instance {pin.endpoint} of backend '{pin.backend}'" if pin.endpoint else f"backend '{pin.backend}'"
            raise GatewayError(409, f"{noun} '{pinned_id}' is held by {where}, which is no longer configured; "
                                    "its conversation cannot be continued", param=param, code="pinned_backend_gone")
        return backend

    # -- /v1/responses/{id}[/cancel|/input_items] --------------------------------------------------

    def resource(self, method: str, response_id: str, suffix: str,
                 query: str) -> Decision[Answered | Forwarded | background.Follow]:
        values = yield Reads(_state_keys(self.tenant, response_id))
        turn = rec.load_turn(values[0]) if values else None
        if turn is not None:
            self._decide(PinDecision.TURN_HIT)
            if method == "GET" and not suffix and (after := background.stream_query(query)) is not None:
                return background.follow(turn, self.tenant, response_id, after)  # its event log, streamed
            if method == "GET" and not suffix and background.unfinished(turn):  # a poll: is its run alive?
                lease = yield Reads((background.lease_key(self.tenant, response_id),))
                if lease is not None and lease[0] is None:  # its replica stopped renewing it
                    turn, writes = background.lost(turn, self.tenant, response_id)
                    self.background_outcome = background.LOST_OUTCOME
                    return Answered(200, orjson.dumps(turn["response"]), writes)
            if suffix == "/input_items":
                return Answered(200, rec.input_items_page(turn["input"], query))
            if suffix == "/cancel":  # a background run the sidecar holds (state/background.py)
                return Answered(200, *background.cancel(turn, self.tenant, response_id))
            if method == "DELETE":
                return Answered(200, rec.deleted(response_id), [(rec.turn_key(self.tenant, response_id), None)])
            return Answered(200, orjson.dumps(turn["response"]))
        pin = rec.Pin.loads(values[1]) if values and values[1] else None
        if pin is not None:
            return Forwarded(self.pinned_target(response_id, pin), PinDecision.PIN_HIT, response_id)
        backend = self.gw.responses_backend
        if values is not None and self._owned_elsewhere(values):
            raise rec.response_not_found(response_id)
        if backend is None or not tells_callers_apart(backend):
            if values is None and backend is not None:
                self._decide(PinDecision.STATE_UNAVAILABLE)
                raise state_unavailable()
            self._decide(PinDecision.UNKNOWN_ID)
            raise rec.response_not_found(response_id)
        return Forwarded(self.gw.target(backend, response_id), self._decide(PinDecision.PIN_FALLBACK), None)

    # -- recording ------------------------------------------------------------------------------

    def turn_writes(self, response: dict[str, Any] | None, items: list[dict[str, Any]], ancestors: list[str],
                    endpoint: str | None, backend: str | None) -> Writes:
        """Keep a translated Response (with its input) so previous_response_id can continue from it."""
        if response is None or response.get("status") not in ("completed", "incomplete"):
            return []
        record = rec.turn_record(response, items, ancestors, endpoint, backend)
        if len(record) > self.gw.config.state.max_record_bytes:
            log.warning("response %s not stored: %d bytes exceeds state.max_record_bytes", response["id"], len(record))
            return []
        return [(rec.turn_key(self.tenant, response["id"]), record), rec.owner_write(self.tenant, response["id"])]


def response_pin(tenant: str, response_id: str, pin: rec.Pin) -> Writes:
    """A response id's pin, and its owner."""
    return [(rec.pin_key(tenant, response_id), pin.dumps()), rec.owner_write(tenant, response_id)]


class IdRecorder:
    """Pins a Responses answer's id to the instance that made it: the top-level `id` of a Response
    body, or the `response.id` of a stream's `response.created` event. A body is parsed once whole (one
    larger than `_BODY_LIMIT` is not pinned); a stream is read only until that event, and at most
    `_STREAM_LIMIT` bytes. `pins` says what the pin is written as (a conversation's: its own key)."""

    def __init__(self, tenant: str, target: Target, sse: bool, pins: PinWrites = response_pin):
        self.tenant = tenant
        self.target = target
        self.pins = pins
        self.events = SSEDecoder() if sse else None
        self.body: list[bytes] = []
        self.size = 0
        self.done = False

    def feed(self, chunk: bytes, end_of_stream: bool) -> Writes:
        self.size += len(chunk)
        response_id = self._from_stream(chunk) if self.events is not None else self._from_body(chunk, end_of_stream)
        limit = _STREAM_LIMIT if self.events is not None else _BODY_LIMIT
        if response_id is None and not end_of_stream and self.size <= limit:
            return []
        self.done = True
        self.body = []
        if response_id is None:
            log.warning("no response id in the first %d bytes of the reply; not pinned", self.size)
            return []
        return self.pins(self.tenant, response_id, rec.Pin(self.target.backend.name, self.target.endpoint))

    def _from_stream(self, chunk: bytes) -> str | None:
        assert self.events is not None
        for event in self.events.feed(chunk):
            doc = _json(event.data.encode())
            if isinstance(doc, dict) and doc.get("type") == "response.created":
                response = doc.get("response")
                return _usable_id(response.get("id") if isinstance(response, dict) else None)
        return None

    def _from_body(self, chunk: bytes, end_of_stream: bool) -> str | None:
        if self.size <= _BODY_LIMIT:
            self.body.append(chunk)
        if not end_of_stream or self.size > _BODY_LIMIT:
            return None
        doc = _json(b"".join(self.body))
        return _usable_id(doc.get("id") if isinstance(doc, dict) else None)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _usable_id(value: Any) -> str | None:
    """An id the sidecar keys records by: a string of at most 200 characters."""
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID else None
