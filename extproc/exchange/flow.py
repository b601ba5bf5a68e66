"""One HTTP exchange through the sidecar, as a sans-IO state machine.

The gRPC servicer feeds it Envoy's messages (request headers, request body, response headers,
response body chunks) and turns each returned `Action` into a ProcessingResponse. Nothing here
does I/O, so every decision can be unit-tested with plain dicts and bytes.

Phases Envoy is asked for: request headers and the buffered request body always; response headers
and body only when the response must be translated, or when a Responses reply's id must be recorded
(then only up to the chunk that carries it). `Action.done` ends the exchange early, and Envoy passes
the rest through untouched.

Stored state (pins, sidecar-held turns, learned modes) is reached the h11 way: a method returns
`Lookup(keys, then)`, the shell fetches the keys and calls `then(values)`; writes ride on
`Action.writes`.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from extproc.api import API_OF_PATH, AUTO, BOTH, CHAT, PATHS, RESPONSES
from extproc.config import Backend
from extproc.errors import GatewayError, invalid, upstream_error_payload
from extproc.exchange.body import check_json_request, is_json, parse_body
from extproc.ops.usage import Usage, UsageScanner, estimate, request_text_bytes, text_bytes, usage_of
from extproc.routing.classify import Resolution
from extproc.routing.gateway import ROUTING_HEADERS, Gateway, Target, placement_key
from extproc.routing.modes import LOCAL_TTL, Learned, learned_key, rejection_needs
from extproc.state import conversations as conv
from extproc.translate import (
    compact,
    req_chat_to_responses,
    req_responses_to_chat,
    resp_chat_to_responses,
    resp_responses_to_chat,
)
from extproc.translate.common import new_id
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from extproc.translate.stream_responses_to_chat import ResponsesToChatStream
from extproc.translate.tools import tool_map

log = logging.getLogger("extproc")

BUFFERED, STREAMED = "BUFFERED", "STREAMED"
MODE_HEADER = "x-gateway-model-mode"  # per-request mode override, when discovery.allow_mode_header
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
_ID_SCAN_LIMIT = 64 * 1024  # a reply whose id is not in its first 64 KiB is not pinned
# What Envoy's reply says when it could not reach the upstream instance at all.
_UNREACHABLE = (b"upstream connect error", b"no healthy upstream", b"upstream_reset_before_response_started",
                b"delayed_connect_error")


class StreamTranslator(Protocol):
    response: dict[str, Any] | None  # the final Response object, once the stream has ended

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
    writes: list[tuple[str, bytes | None]] = field(default_factory=list)  # store writes (None deletes) first
    write_ttl: int | None = None  # seconds; None: the store's default
    done: bool = False  # nothing more to do for this exchange: close the ext_proc stream


@dataclass(slots=True)
class Lookup:
    """The exchange needs these store keys to decide: the shell fetches them and calls `then` with
    their values, or with None when the store is unavailable."""

    keys: tuple[str, ...]
    then: Callable[[list[bytes | None] | None], Action | Lookup]


def error_action(err: GatewayError) -> Action:
    return Action(immediate=(err.status, err.body(), "application/json"), done=True)


def new_body(body: bytes, **kw: Any) -> Action:
    """The answer's body replaced (buffered mode), its content-length with it; the exchange ends."""
    return Action(body=body, set_headers=[("content-length", str(len(body)))], done=True, **kw)


def state_unavailable() -> GatewayError:
    return GatewayError(503, "the conversation store is unavailable; retry shortly", code="state_unavailable")


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
        self.record_pin = False  # read the reply's id and pin it to `target`
        self.id_scan = b""
        self.pinned_id: str | None = None  # the response id this request was routed by
        self.turn: tuple[list[dict[str, Any]], list[str]] | None = None  # (input items, ancestors) to store
        self.dropped_tools: list[str] = []  # hosted tools removed for a chat backend, reported to the client
        self.learned: Learned | None = None  # what replicas learned about this model's API
        self.learning = False  # watch the upstream's answer to learn the model's API
        self.learned_fact: str | None = None  # what this exchange taught: needs_<api> | answers_<api>
        self.pin_decision: str | None = None  # pin_hit | pin_fallback | pin_gone | turn_hit | turn_miss | ...
        self.scanner: UsageScanner | None = None  # reads usage from an answer passed through untouched
        self.usage: Usage | None = None
        self.chunks = 0  # response body messages handled
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error
        self.compacting = False  # POST /v1/responses/compact
        self.compact_items: list[dict[str, Any]] = []  # the conversation a chat backend is asked to summarise
        self.tenant = ""  # whose compaction items this request may read (tenancy sets it)

    @property
    def translated(self) -> bool:
        return self.upstream_api is not None and self.upstream_api != self.client_api

    @property
    def observe(self) -> bool:
        """Read usage from an answer in the client's own API (usage_accounting: all)."""
        return self.client_api is not None and self.gw.config.usage_accounting == "all" and not self.translated

    # -- request --------------------------------------------------------------------------------

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Action:
        self.headers = headers
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        self.client_api = API_OF_PATH.get(self.path.partition("?")[0])
        if self.path.partition("?")[0] == compact.PATH:
            if self.method != "POST":
                raise GatewayError(405, f"{self.method} is not supported on {compact.PATH}", code="method_not_allowed")
            self.client_api, self.compacting = RESPONSES, True
            return Action()
        resource = conv.RESOURCE_RE.match(self.path.partition("?")[0])
        if resource is not None:
            return self._resource_lookup(resource.group(1), resource.group(2) or "")
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

    def request_body(self, raw: bytes) -> Action | Lookup:
        if self.target is not None:  # already routed from its headers (POST /v1/responses/{id}/cancel)
            return Action()
        limit = self.gw.config.limits.max_body_bytes
        if len(raw) > limit:
            raise GatewayError(413, f"request body of {len(raw)} bytes exceeds the gateway limit of {limit} bytes",
                               code="request_too_large")
        ctype = self.headers.get("content-type", "")
        if self.client_api is None and not is_json(ctype):
            return self._route(Target(self.gw.default_backend, self._default_endpoint()), body=None)
        check_json_request(self.headers)
        body = parse_body(raw)
        if self.compacting:
            compact.check_request(body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required and must be a non-empty string", param="model",
                               code="invalid_value" if "model" in body else "missing_required_parameter")
        self.model = model
        self.request = body
        backend = self.gw.classifier.backend_for(model)
        if backend is None:
            raise GatewayError(404, f"The model '{model}' does not exist or no backend serves it",
                               param="model", code="model_not_found")
        if backend.api in (AUTO, BOTH) and self.client_api is not None:
            learned = self.gw.knowledge.learned(backend.name, model, self.gw.clock())
            if learned is None:  # not known here lately: what have the other replicas learned?
                return Lookup((learned_key(backend.name, model),), lambda values: self._with_learned(backend, values))
            self.learned = learned
        return self._resolved()

    def _with_learned(self, backend: Backend, values: list[bytes | None] | None) -> Action | Lookup:
        assert self.model is not None
        self.learned = Learned.loads(values[0] if values else None)
        if values is not None:  # a store outage is not remembered as "nothing learned"
            self._remember(backend.name, self.learned)
        return self._resolved()

    def _resolved(self) -> Action | Lookup:
        model, body = self.model or "", self.request
        override = self.headers.get(MODE_HEADER) if self.gw.config.discovery.allow_mode_header else None
        res = self.gw.classifier.resolve(model, override=override, learned=self.learned)
        assert res is not None
        target = self.gw.target(res.backend, placement_key(body, self.headers))
        if self.client_api is None:
            return self._route(target, body=None)
        self.upstream_api = res.upstream_api(self.client_api)
        if self.upstream_api is None:
            path = PATHS[res.mode]
            raise GatewayError(400, f"The model '{model}' is only available on {path}, and translation is turned "
                                    f"off for it: call {path} instead", param="model", code="unsupported_api")
        stream = body.get("stream", False)
        self.stream = stream is True
        # Nothing said which API this model answers on: watch the answer, and learn from it.
        self.learning = res.learning and self.client_api not in (self.learned.ok if self.learned else ())
        if self.client_api == RESPONSES:
            prev = body.get("previous_response_id")
            if prev is not None:
                if not isinstance(prev, str) or not prev:
                    raise invalid("previous_response_id", "expected a response id string")
                return Lookup((conv.turn_key(prev), conv.pin_key(prev)),
                              lambda values: self._continue_from(prev, res, target, values))
            return self._forward(res, target, [])
        if not self.translated:
            return self._route(target, body=None)
        return self._route(target, body=orjson.dumps(req_chat_to_responses.translate_request(body)))

    # -- Responses requests: state ----------------------------------------------------------------

    def _forward(self, res: Resolution, target: Target, prior: list[dict[str, Any]],
                 ancestors: list[str] | None = None) -> Action:
        """Send a Responses request on, `prior` items (a sidecar-held conversation) merged into its input."""
        body = self.request
        keep = body.get("store") is not False and not self.compacting
        opened = compact.open_items(body.get("input"), self.gw.sealer, self.tenant, chat_backend=self.translated)
        if opened is not None:  # the sidecar's own compaction items: their summaries instead
            body = {**body, "input": opened}
        if self.translated:
            items = conv.input_items(body.get("input"))
            if keep:
                self.turn = (items, ancestors or [])
            b = res.backend
            if self.compacting:
                self.compact_items = prior + items
                return self._route(target, body=orjson.dumps(compact.chat_request(body, self.compact_items,
                                                                                  b.chat_max_tokens_field)))
            body = {**body, "input": prior + items} if prior else body
            new = req_responses_to_chat.translate_request(body, max_tokens_field=b.chat_max_tokens_field,
                                                          hosted_tools=b.hosted_tools, replay_reasoning=b.replay_reasoning)
            self.dropped_tools = tool_map(body.get("tools")).hosted
            if self.dropped_tools:
                log.info("model=%s backend=%s: hosted tools dropped: %s", self.model, b.name, ",".join(self.dropped_tools))
            return self._route(target, body=orjson.dumps(new))
        # A Responses backend keeps its own state: pin the reply's id to the instance that made it.
        self.record_pin = keep  # endpoint backends and clusters alike: GET /v1/responses/{id} must find it
        if prior:  # the conversation so far was kept by the sidecar: hand it over whole
            new = {k: v for k, v in body.items() if k != "previous_response_id"}
            new["input"] = prior + conv.input_items(body.get("input"))
            return self._route(target, body=orjson.dumps(new))
        return self._route(target, body=orjson.dumps(body) if opened is not None else None)

    def _continue_from(self, prev: str, res: Resolution, target: Target,
                       values: list[bytes | None] | None) -> Action | Lookup:
        if values is None:
            if self.translated:
                self.pin_decision = "state_unavailable"
                raise state_unavailable()
            self.pin_decision = "pin_fallback"
            log.warning("previous_response_id %s: store unavailable, routing by ring", prev)
            return self._forward(res, self.gw.target(res.backend, prev), [])
        turn, pin = conv.load_turn(values[0]), conv.Pin.loads(values[1]) if values[1] else None
        if turn is not None:
            ancestors = turn.get("ancestors") or []
            if not ancestors:
                return self._continue_turns(prev, res, target, turn, [], [])
            return Lookup(tuple(conv.turn_key(a) for a in ancestors),
                          lambda vals: self._continue_turns(prev, res, target, turn, ancestors, vals))
        if pin is not None:
            if self.translated:
                raise GatewayError(400, f"Previous response '{prev}' is held by backend '{pin.backend}', but model "
                                        f"'{self.model}' is served by chat-only backend '{res.backend.name}', which "
                                        "cannot continue it", param="previous_response_id",
                                   code="previous_response_not_found")
            self.pin_decision = "pin_hit"
            self.pinned_id = prev
            return self._forward(res, self._pinned_target(prev, pin), [])
        if self.translated:
            self.pin_decision = "turn_miss"
            raise conv.previous_not_found(prev)
        self.pin_decision = "pin_fallback"
        log.info("previous_response_id %s: no pin recorded, routing by ring", prev)
        return self._forward(res, self.gw.target(res.backend, prev), [])

    def _continue_turns(self, prev: str, res: Resolution, target: Target, turn: dict[str, Any],
                        ancestors: list[str], values: list[bytes | None] | None) -> Action:
        if values is None:
            self.pin_decision = "state_unavailable"
            raise state_unavailable()
        turns = [conv.load_turn(v) for v in values]
        for aid, t in zip(ancestors, turns, strict=True):
            if t is None:
                raise GatewayError(404, f"An earlier response in this conversation ('{aid}') has expired or was "
                                        "deleted, so it cannot be continued", param="previous_response_id",
                                   code="previous_response_not_found")
        self.pin_decision = "turn_hit"
        endpoint = turn.get("endpoint")  # same instance as before when it is still there: its prefix cache
        if self.translated and endpoint in {e.address for e in res.backend.endpoints}:
            target = Target(res.backend, endpoint)
        return self._forward(res, target, conv.history([*turns, turn]), conv.chain(turn, prev))

    def _pinned_target(self, response_id: str, pin: conv.Pin) -> Target:
        backend = self.gw.config.backend(pin.backend)
        if backend is None or (pin.endpoint is not None and pin.endpoint not in {e.address for e in backend.endpoints}):
            self.pin_decision = "pin_gone"
            where = f"instance {pin.endpoint} of backend '{pin.backend}'" if pin.endpoint else f"backend '{pin.backend}'"
            raise GatewayError(409, f"Response '{response_id}' is held by {where}, which is no longer configured; "
                                    "its conversation cannot be continued", param="previous_response_id",
                               code="pinned_backend_gone")
        return Target(backend, pin.endpoint)

    def _resource_lookup(self, response_id: str, suffix: str) -> Action | Lookup:
        allowed = {"": ("GET", "DELETE"), "/cancel": ("POST",), "/input_items": ("GET",)}[suffix]
        if self.method not in allowed:
            raise GatewayError(405, f"{self.method} is not supported on /v1/responses/{{id}}{suffix}",
                               code="method_not_allowed")
        self.pinned_id = response_id
        return Lookup((conv.turn_key(response_id), conv.pin_key(response_id)),
                      lambda values: self._resource(response_id, suffix, values))

    def _resource(self, response_id: str, suffix: str, values: list[bytes | None] | None) -> Action:
        """GET/DELETE/cancel/input_items: answered from a held turn, else sent where the response lives."""
        turn = conv.load_turn(values[0]) if values else None
        if turn is not None:
            self.pin_decision = "turn_hit"
            if suffix == "/input_items":
                return Action(immediate=(200, conv.input_items_page(turn["input"], self.path.partition("?")[2]),
                                         "application/json"), done=True)
            if suffix == "/cancel":
                raise GatewayError(400, "Only responses created with background=true can be cancelled.",
                                   code="invalid_request_error")
            if self.method == "DELETE":
                return Action(immediate=(200, conv.deleted(response_id), "application/json"),
                              writes=[(conv.turn_key(response_id), None)], done=True)
            return Action(immediate=(200, orjson.dumps(turn["response"]), "application/json"), done=True)
        pin = conv.Pin.loads(values[1]) if values and values[1] else None
        if pin is not None:
            self.pin_decision = "pin_hit"
            return self._route(self._pinned_target(response_id, pin), body=None)
        backend = self.gw.responses_backend
        if backend is None:
            raise conv.response_not_found(response_id)
        self.pin_decision = "pin_fallback"
        self.pinned_id = None
        return self._route(self.gw.target(backend, response_id), body=None)

    def _route(self, target: Target, body: bytes | None) -> Action:
        self.target = target
        path = self.path
        if self.translated:
            path = PATHS[self.upstream_api] + ("?" + self.path.partition("?")[2] if "?" in self.path else "")
        headers = target.headers()
        if target.backend.path_prefix:
            path = target.backend.path_prefix + path
        if path != self.path:
            headers.append((":path", path))
        remove = tuple(h for h in (*ROUTING_HEADERS, MODE_HEADER) if h not in {k for k, _ in headers})
        if body is not None:
            headers.append(("content-length", str(len(body))))
            headers.append(("accept-encoding", "identity"))  # translated answers must arrive readable
        return Action(set_headers=headers, remove_headers=remove, body=body, clear_route_cache=True,
                      done=not (self.translated or self.record_pin or self.pinned_id or self.learning or self.observe))

    # -- response -------------------------------------------------------------------------------

    def response_headers(self, headers: dict[str, str]) -> Action:
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 502
        if not self.translated:
            return self._untranslated_headers(headers)
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
            return Action(set_headers=[("content-type", "text/event-stream; charset=utf-8"), *self._notes()],
                          remove_headers=remove, response_body_mode=STREAMED)
        return Action(set_headers=[("content-type", "application/json"), *self._notes()], remove_headers=remove,
                      response_body_mode=BUFFERED)

    def _notes(self) -> list[tuple[str, str]]:
        """Response headers that tell the client what translation changed."""
        return [("x-gateway-dropped-tools", ",".join(self.dropped_tools))] if self.dropped_tools else []

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

    def _untranslated_headers(self, headers: dict[str, str]) -> Action:
        """A reply in the client's own API: read its id (to pin it), learn from it, or explain a lost
        pinned instance."""
        if self.pinned_id and self.status == 503:  # Envoy's own "upstream connect error" reply?
            self.record_pin = self.learning = False
            self.scanner = None
            return Action(response_body_mode=BUFFERED)
        if self.learning and self.status in (400, 404, 405, 422):
            return Action(response_body_mode=BUFFERED)  # does it say the model is on the other API?
        ok = 200 <= self.status < 300
        writes = self._learn(ok=True) if self.learning and ok else []
        self.learning = False
        self.record_pin = self.record_pin and self.status == 200
        if ok and self.observe:
            self.scanner = UsageScanner(sse=headers.get("content-type", "").startswith("text/event-stream"))
        if self.record_pin or self.scanner is not None:
            return Action(response_body_mode=STREAMED, writes=writes, write_ttl=self._learn_ttl(writes))
        return Action(writes=writes, write_ttl=self._learn_ttl(writes), done=True)

    def _learn(self, ok: bool = False, needs: str | None = None) -> list[tuple[str, bytes | None]]:
        """A learned fact about this model's API, merged into what replicas already knew."""
        assert self.target is not None and self.model is not None and self.client_api is not None
        learned = self.learned or Learned()
        if ok:
            learned.ok.add(self.client_api)
            self.learned_fact = "answers_" + self.client_api
        if needs is not None:
            learned.mode = needs
            learned.ok.discard(self.client_api)
            self.learned_fact = "needs_" + needs
        b = self.target.backend.name
        self._remember(b, learned)
        return [(learned_key(b, self.model), learned.dumps())]

    def _remember(self, backend: str, learned: Learned) -> None:
        """A replica's own copy, never trusted longer than the shared record lives."""
        assert self.model is not None
        ttl = min(LOCAL_TTL, self.gw.config.state.learn_ttl_seconds)
        self.gw.knowledge.remember(backend, self.model, learned, self.gw.clock(), ttl)

    def _learn_ttl(self, writes: list[tuple[str, bytes | None]]) -> int | None:
        return self.gw.config.state.learn_ttl_seconds if writes else None

    def _learned_rejection(self, chunk: bytes) -> Action:
        """The upstream said the model needs the other API: remember it, and say a retry will work."""
        assert self.client_api is not None
        self.learning = False
        needs = rejection_needs(self.status, chunk, self.client_api)
        if needs is None:
            return Action(done=True)  # any other error goes to the client untouched
        log.info("model=%s backend=%s: learned that it needs the %s API", self.model,
                 self.target.backend.name if self.target else "?", needs)
        writes = self._learn(needs=needs)
        path = PATHS[needs]
        retry = "retry the request: it will be translated" if self.target and self.target.backend.translate else \
            f"call {path} instead"
        body = GatewayError(self.status, f"The model '{self.model}' is only available on {path} at this backend; "
                                         f"the gateway has learned this, {retry}.",
                            param="model", code="model_api_learned").body()
        return new_body(body, writes=writes, write_ttl=self._learn_ttl(writes))

    def _scan_id(self, chunk: bytes, end_of_stream: bool) -> list[tuple[str, bytes | None]]:
        """Pin the reply's id: the first "id" of a Response body, or of a stream's response.created event."""
        self.id_scan += chunk
        found = _ID_RE.search(self.id_scan)
        if found is None and not end_of_stream and len(self.id_scan) < _ID_SCAN_LIMIT:
            return []
        self.record_pin = False
        assert self.target is not None
        if found is None:
            log.warning("%s: no response id in the first %d bytes of the reply; not pinned", self.path, len(self.id_scan))
            return []
        pin = conv.Pin(self.target.backend.name, self.target.endpoint)
        return [(conv.pin_key(found.group(1).decode()), pin.dumps())]

    def _observed(self, chunk: bytes, end_of_stream: bool) -> Action:
        """An answer in the client's own API, passed on untouched while its id and usage are read."""
        writes = self._scan_id(chunk, end_of_stream) if self.record_pin else []
        if self.scanner is not None:
            self.scanner.feed(chunk)
            if end_of_stream:
                self.scanner.finish()
                self._account(self.scanner.usage, lambda: self.scanner.output_bytes if self.scanner else 0)
        done = end_of_stream or (self.scanner is None and not self.record_pin)
        return Action(writes=writes, done=done)

    def _account(self, usage: Usage | None, output_bytes: Callable[[], int]) -> None:
        """Usage as reported; estimated only when the upstream reported none for a successful answer
        (`output_bytes` is only counted then)."""
        if usage is None and 200 <= self.status < 300:
            usage = estimate(request_text_bytes(self.request), output_bytes())
        self.usage = usage

    def metadata(self) -> dict[str, Any] | None:
        """What Envoy's access log may show of this exchange (dynamic metadata, namespace llm_gateway)."""
        if self.model is None:
            return None
        out: dict[str, Any] = {"model": self.model, "client_api": self.client_api or "",
                               "upstream_api": self.upstream_api or self.client_api or "",
                               "backend": self.target.backend.name if self.target else ""}
        if self.usage is not None:
            out.update(self.usage.as_metadata())
        return out

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        self.chunks += 1
        if not self.translated:
            if self.learning:
                return self._learned_rejection(chunk)
            if self.record_pin or self.scanner is not None:
                return self._observed(chunk, end_of_stream)
            # Only left: a 503 for a pinned request. Envoy's own reply means the instance is gone.
            if not any(sign in chunk for sign in _UNREACHABLE):
                return Action(done=True)
            assert self.target is not None
            where = f"instance {self.target.endpoint} of backend '{self.target.backend.name}'"
            return new_body(GatewayError(503, f"Response '{self.pinned_id}' is held by {where}, which is not "
                                              "answering; retry later", code="pinned_backend_unavailable").body())
        if self.translator is not None:
            try:
                data = self._decode(chunk, end_of_stream)
            except GatewayError as e:
                return Action(body=self.translator.fail(e.code or "upstream_error", e.message), done=True)
            out = self.translator.feed(data)
            if not end_of_stream:
                return Action(body=out)
            out += self.translator.close()
            final = self.translator.response
            self._account(usage_of(final), lambda: text_bytes(orjson.dumps(final["output"])) if final else 0)
            return Action(body=out, writes=self._store_turn(final), done=True)
        body, doc = self._translate_buffered(self._decode(chunk, end_of_stream))
        return new_body(body, writes=self._store_turn(doc))

    def _store_turn(self, response: dict[str, Any] | None) -> list[tuple[str, bytes | None]]:
        """Keep a translated Response (with its input) so previous_response_id can continue from it."""
        if self.turn is None or response is None or response.get("status") not in ("completed", "incomplete"):
            return []
        assert self.target is not None
        record = conv.turn_record(response, self.turn[0], self.turn[1], self.target.endpoint)
        if len(record) > self.gw.config.state.max_record_bytes:
            log.warning("response %s not stored: %d bytes exceeds state.max_record_bytes", response["id"], len(record))
            return []
        return [(conv.turn_key(response["id"]), record)]

    def _translate_buffered(self, data: bytes) -> tuple[bytes, dict[str, Any] | None]:
        """The client's body, and the Response object when one was made (to store)."""
        doc: Any = None
        if 200 <= self.status < 300:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                doc = None
        if isinstance(doc, dict):
            self._account(usage_of(doc), lambda: text_bytes(data))
        else:
            if 200 <= self.status < 300:
                raise GatewayError(502, "the upstream returned a response that is not JSON",
                                   code="bad_upstream_response")
            return orjson.dumps({"error": upstream_error_payload(self.status, data)}), None
        if self.client_api == CHAT:
            return orjson.dumps(resp_responses_to_chat.translate_response(doc, self.model or "")), None
        if self.compacting:
            return orjson.dumps(compact.compaction_resource(doc, self.compact_items, self.gw.sealer, self.tenant)), None
        resp = resp_chat_to_responses.translate_response(doc, self.request, new_id("resp_"))
        return orjson.dumps(resp), resp
