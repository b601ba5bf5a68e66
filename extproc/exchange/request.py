"""The request side: request headers and body resolved once into an immutable `Plan` and Envoy's routing (sans-IO).

Each path has one handler, picked from a table (`handler_for`): a POST of an API family (`ApiCall`
for every path in `api.PATHS`, `ResponsesCall` for `/v1/responses`, and its `Compact` and
`CountTokens` calls; `MessagesCount` for Anthropic's `/v1/messages/count_tokens`), a
`/v1/responses/{id}` `Resource`, a `ConversationCall` for the Conversations API, `ModelList`, and
`PassOn` for anything else. A handler is straight-line code: where it needs the store it yields its
reads (`Reads`, see `state.lookup`) and goes on with the values. Order of decisions for an API call:
the body (media type, one strict parse, `model`), the model's backend and API (learned facts may
need a store read), then state (`previous_response_id`, in `state.pinning`, or a `conversation`, in
`state.conversations`), and last the `Plan`, with the rewrite and routing headers for Envoy; or, for
a background turn on a chat-only model, the queued answer and the run the shell starts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from extproc.api import API_OF_PATH, AUTO, BOTH, MESSAGES, PATHS, RESPONSES
from extproc.config import Backend
from extproc.envoy.names import H_FIRST_CONTACT, H_FOLLOW, MODE_HEADER, ROUTING_HEADERS
from extproc.errors import GatewayError, invalid
from extproc.exchange import failover
from extproc.exchange.actions import Action, Writes, answer
from extproc.exchange.body import check_json_request, is_json, parse_body
from extproc.exchange.first_contact import mark
from extproc.exchange.paths import COUNT_TOKENS, INPUT_TOKENS, check_request_line
from extproc.exchange.plan import ModelFacts, Plan, Turn, remember
from extproc.routing.classify import Resolution
from extproc.routing.gateway import Gateway, Target, placement_key
from extproc.routing.key_paths import check_key_path
from extproc.routing.model_name import check_model_name
from extproc.routing.modes import Learned, learned_key
from extproc.routing.needs import Call, Facts, Need, envoy_counts, needs, passed_on
from extproc.routing.providers import upstream_path, with_deployment
from extproc.state import background, conversations
from extproc.state import records as rec
from extproc.state.lookup import Decision, Reads
from extproc.state.pinning import Answered, Continuation, Pinning, check_item_references
from extproc.translate import compact, compact_trigger
from extproc.translate.messages import ESTIMATED_HEADER, estimated_input_tokens
from extproc.translate.pairs import TranslatorPair, pair_for

log = logging.getLogger("extproc")

Handled = Action | Decision[Action]  # a handler's answer: at once, or after store reads


def decided(step: Handled) -> Decision[Action]:
    """`yield from decided(step)`: the handler's Action, once the reads it needs are answered."""
    if isinstance(step, Generator):
        return (yield from step)
    return step


class PathHandler(Protocol):
    """What the request side does with one kind of path."""

    client_api: str | None  # the API family it is a call of; None: not an API call

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Handled: ...
    def on_body(self, side: RequestSide, raw: bytes) -> Handled: ...


class PassOn:
    """Any path that is not the sidecar's (embeddings, completions, files...): a JSON body goes to the
    backend of its `model`, anything else, body-less requests too, to the default backend."""

    client_api: str | None = None

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Handled:
        return side.pass_on() if end_of_stream else Action()  # else the body decides

    def on_body(self, side: RequestSide, raw: bytes) -> Handled:
        if not is_json(side.headers.get("content-type", "")):
            return side.pass_on()
        check_json_request(side.headers)
        body = parse_body(raw)
        model, _ = side.model_of(body)
        target = side.target_for(side.resolve(model, None), body)
        return side.route(Plan(target, side.pinning, model=model, request=body, needs=passed_on(target.backend)))


class ModelList(PassOn):
    """`GET /v1/models`: the sidecar's own list of the models it routes."""

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Handled:
        if not end_of_stream:
            return Action()
        return answer(200, orjson.dumps({"object": "list", "data": side.gw.model_list()}))


class Resource(PassOn):
    """`/v1/responses/{id}[/cancel|/input_items]`: answered from a held turn, else sent where the
    response lives; decided at the headers (a body, if any, passes on)."""

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Decision[Action]:
        resource = rec.RESOURCE_RE.match(side.bare)
        assert resource is not None
        outcome = yield from side.pinning.resource(side.method, resource.group(1), resource.group(2) or "",
                                                   side.query)
        if isinstance(outcome, Answered):
            return answer(outcome.status, outcome.body, outcome.writes)
        if isinstance(outcome, background.Follow):
            return side.follow(outcome)
        return side.route(Plan(outcome.target, side.pinning, needs=passed_on(outcome.target.backend),
                               pinned_id=outcome.pinned_id))


class ConversationCall:
    """`/v1/conversations[/{id}[/items[/{item_id}]]]`: the Conversations API, answered by the sidecar
    from its store (`state.conversations`); with a backend that holds conversations (`conversations:
    passthrough`), a create call goes to it, its id pinned, and every call on a pinned id passes
    through to that instance untouched."""

    client_api: str | None = None

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Handled:
        return self.answer(side, None) if end_of_stream else Action()  # else with its body

    def on_body(self, side: RequestSide, raw: bytes) -> Handled:
        check_json_request(side.headers)
        return self.answer(side, parse_body(raw))

    def answer(self, side: RequestSide, body: dict[str, Any] | None) -> Decision[Action]:
        where = conversations.route(side.bare)
        assert where is not None
        holder = side.gw.conversations_backend
        if where.conversation_id is None and holder is not None:  # no model to route by: placed on its ring
            target = side.gw.target(holder, placement_key({}, side.headers))
            return side.route(Plan(target, side.pinning, needs=passed_on(holder) | {Need.RECORD_ID},
                                   pins=conversations.pin_writes))
        calls = conversations.Conversations(side.pinning.tenant, side.gw.config.state.max_record_bytes)
        reply = yield from calls.call(side.method, where, side.query, body)
        if isinstance(reply, rec.Pin):  # the backend's conversation, on the instance that holds it
            assert where.conversation_id is not None
            target = side.pinning.pinned_target(where.conversation_id, reply, "Conversation", None)
            return side.route(Plan(target, side.pinning, needs=passed_on(target.backend),
                                   pinned_id=where.conversation_id,
                                   forgets=conversations.forgotten(side.pinning.tenant, side.method, where)))
        return answer(reply.status, reply.body, reply.writes)


@dataclass(frozen=True, slots=True)
class Resolved:
    """An API call resolved, before it is sent: what its plan is made of."""

    body: dict[str, Any]
    model: str
    res: Resolution
    learned: Learned | None
    facts: Facts
    pair: TranslatorPair | None

    @property
    def stateless_backend(self) -> bool:
        """The call is translated for a backend that keeps no Responses state (chat, Messages): the
        sidecar is the state. A compact sent as a turn to a Responses backend is not."""
        return self.pair is not None and self.pair.upstream_api != RESPONSES

    def plan(self, side: RequestSide, target: Target, pinned_id: str | None = None, turn: Turn | None = None,
             conversation: conversations.Held | None = None) -> Plan:
        """The plan of the call sent to `target`, with what it needs there (`routing.needs`; a pin may
        name another backend than the model's)."""
        res = self.res if target.backend.name == self.res.backend.name else \
            dataclasses.replace(self.res, backend=target.backend)
        n = needs(side.gw.config, res, self.facts, self.learned)
        client_api = self.facts.client_api
        learning = ModelFacts(side.gw, self.res.backend.name, self.model, client_api, self.learned) \
            if Need.LEARN in n else None
        return Plan(target, side.pinning, client_api=client_api, model=self.model, request=self.body, needs=n,
                    pair=self.pair, stream=self.facts.stream, facts=learning,
                    turn=turn if Need.KEEP_TURN in n else None, pinned_id=pinned_id,
                    conversation=conversation if Need.CONVERSATION in n else None,
                    envoy_counts=side.envoy_counts and envoy_counts(n))


class ApiCall:
    """A POST of one API family: routed by its model, translated both ways when the model's backend
    speaks the other API. A family added to `api.PATHS` is one of these."""

    call = Call.CREATE

    def __init__(self, client_api: str):
        self.client_api: str | None = client_api

    def on_headers(self, side: RequestSide, end_of_stream: bool) -> Handled:
        return Action()  # the body decides (`check_request_line` refused a call without one)

    def check(self, body: dict[str, Any]) -> None:
        """What this call requires of its body beyond the family's."""

    def upstream_api(self, model: str, res: Resolution, client_api: str) -> str:
        """The API the call goes out on."""
        upstream_api = res.upstream_api(client_api)
        if upstream_api is None:
            path = PATHS[res.mode]
            raise GatewayError(400, f"The model '{model}' is only available on {path}, and translation is turned "
                                    f"off for it: call {path} instead", param="model", code="unsupported_api")
        return upstream_api

    def translator(self, side: RequestSide, body: dict[str, Any], model: str, res: Resolution,
                   upstream_api: str, learned: Learned | None) -> TranslatorPair | None:
        assert self.client_api is not None
        return pair_for(self.client_api, upstream_api, body, model, res.backend)

    def on_body(self, side: RequestSide, raw: bytes) -> Decision[Action]:
        client_api = self.client_api
        assert client_api is not None
        check_json_request(side.headers)
        body = parse_body(raw)
        self.check(body)
        model, backend = side.model_of(body)
        handed = yield from failover.hand_over(side, self.call, body, model)  # a model group's attempts
        if handed is not None:
            return handed
        learned = yield from side.learned(backend, model, self.call)
        res = side.resolve(model, learned)
        pair = self.translator(side, body, model, res, self.upstream_api(model, res, client_api), learned)
        call = Resolved(body, model, res, learned, Facts.of(client_api, self.call, body, side.headers), pair)
        return (yield from decided(self.send(side, call)))

    def send(self, side: RequestSide, call: Resolved) -> Handled:
        """The call on its way, translated if need be."""
        plan = call.plan(side, side.target_for(call.res, call.body))
        return side.route(plan, call.pair.request(call.body) if call.pair is not None else None)


class ResponsesCall(ApiCall):
    """`POST /v1/responses`: a turn that may continue a conversation (`previous_response_id`, or a
    `conversation` the sidecar holds), and whose stored answer the sidecar keeps: pinned to its
    instance, or held as a translated turn. On a chat-only model a `compaction_trigger` last in
    `input` is answered with the sealed compaction item, and `background: true` is run by the sidecar."""

    def __init__(self) -> None:
        super().__init__(RESPONSES)

    def translator(self, side: RequestSide, body: dict[str, Any], model: str, res: Resolution,
                   upstream_api: str, learned: Learned | None) -> TranslatorPair | None:
        pair = super().translator(side, body, model, res, upstream_api, learned)
        if self.call is Call.CREATE and compact_trigger.triggered(body) and pair is not None:
            return compact_trigger.TriggerOnChat(body, res.backend, side.gw.sealer, side.pinning.tenant)
        return pair

    def send(self, side: RequestSide, call: Resolved) -> Decision[Action]:
        """A conversation the sidecar kept merged into the input, or the request sent where it lives."""
        body, target = call.body, side.target_for(call.res, call.body)
        stateless = call.stateless_backend
        in_background = self.call is Call.CREATE and background.requested(
            body, stateless, side.gw.config.websocket_listen is not None)
        prev = body.get("previous_response_id")
        cont, held = Continuation(target), None
        if body.get("conversation") is not None:
            kept = yield from conversations.read(side.pinning.tenant, body)
            if isinstance(kept, rec.Pin):  # a backend's conversation: the turn passes through to its instance
                cid = conversations.conversation_id(body["conversation"])
                cont = Continuation(self.conversation_target(side, call, cid, kept), pinned_id=cid)
            else:  # the sidecar's own: no conversation id reaches a backend
                held = kept
                body = {k: v for k, v in body.items() if k != "conversation"}
                call = dataclasses.replace(call, body=body)
                cont = Continuation(target, prior=held.items)
        elif prev is not None:
            if not isinstance(prev, str) or not prev:
                raise invalid("previous_response_id", "expected a response id string")
            cont = yield from side.pinning.continue_from(prev, call.model, call.res, target, stateless)
        if in_background:  # answered queued now; the shell runs it (front/background.py)
            run = background.Run.start(body, side.pinning.tenant, side.headers, cont.ancestors,
                                       side.gw.config.limits)
            queued, writes = run.queued()
            act = side.follow(run.follow(), writes) if run.streams else answer(200, queued, writes)
            act.background = run
            return act
        opened = compact.open_items(body.get("input"), side.gw.sealer, side.pinning.tenant, stateless)
        if opened is not None:  # the sidecar's own compaction items: their summaries instead
            body = {**body, "input": opened}
        # The held history, cut to its compacted window, the sidecar's compaction items opened.
        prior = compact_trigger.held_context(cont.prior, side.gw.sealer, side.pinning.tenant, stateless)
        items = rec.input_items(body.get("input"))
        extended = None if held is None else \
            conversations.Held.turn(held, side.pinning.tenant, side.gw.config.state.max_record_bytes, items)
        if (pair := call.pair) is not None and stateless:
            plan = call.plan(side, cont.target, cont.pinned_id, Turn(items, cont.ancestors), extended)
            new = pair.request({**body, "input": prior + items} if prior else body)
            if pair.dropped_tools:
                log.info("model=%s backend=%s: hosted tools dropped: %s", call.model, plan.target.backend.name,
                         ",".join(pair.dropped_tools))
            return side.route(plan, new)
        # A Responses backend keeps its own state: the plan pins the reply's id to the instance that
        # made it (Need.RECORD_ID; endpoint backends and clusters alike: GET /v1/responses/{id} must find it).
        plan = call.plan(side, cont.target, cont.pinned_id, conversation=extended)
        check_item_references(plan.target.backend, body.get("input"))
        sent: dict[str, Any] | None = body if opened is not None else None
        if prior or held is not None:  # the conversation so far was kept by the sidecar: hand it over whole
            sent = {k: v for k, v in body.items() if k != "previous_response_id"}
            sent["input"] = prior + items
        if call.pair is not None:  # a compact as a compaction_trigger turn (compact_trigger.CompactAsTurn)
            sent = call.pair.request(sent or body)
        return side.route(plan, sent)

    @staticmethod
    def conversation_target(side: RequestSide, call: Resolved, cid: str, pin: rec.Pin) -> Target:
        """The instance holding a backend's conversation, which only that backend's models can continue."""
        if pin.backend != call.res.backend.name:  # its items are the backend's: the gateway has no copy
            raise GatewayError(400, f"Conversation '{cid}' is held by backend '{pin.backend}', so only its models can "
                                    f"continue it; model '{call.model}' is served by backend "
                                    f"'{call.res.backend.name}'. Use a model of '{pin.backend}', or send the "
                                    f"conversation's items (GET /v1/conversations/{cid}/items) as 'input' without "
                                    "'conversation'", param="conversation", code="invalid_value")
        return side.pinning.pinned_target(cid, pin, "Conversation", "conversation")


class Compact(ResponsesCall):
    """`POST /v1/responses/compact`: summarised by the sidecar on chat-only backends; not a turn. At a
    Responses backend known to lack the endpoint for the model, sent as a compaction_trigger turn."""

    call = Call.COMPACT

    def check(self, body: dict[str, Any]) -> None:
        compact.check_request(body)

    def translator(self, side: RequestSide, body: dict[str, Any], model: str, res: Resolution,
                   upstream_api: str, learned: Learned | None) -> TranslatorPair | None:
        if super().translator(side, body, model, res, upstream_api, learned) is not None:
            return compact.CompactOnChat(res.backend, side.gw.sealer, side.pinning.tenant)
        facts = Facts.of(RESPONSES, self.call, body, side.headers)
        if Need.TRANSLATE in needs(side.gw.config, res, facts, learned):  # the backend lacks the endpoint
            return compact_trigger.CompactAsTurn()
        return None


class CountTokens(ResponsesCall):
    """`POST /v1/responses/input_tokens`: only a Responses backend can count (what a count needs is
    `routing.needs`': no turn, no usage, nothing learned)."""

    call = Call.COUNT

    def upstream_api(self, model: str, res: Resolution, client_api: str) -> str:
        if res.upstream_api(client_api) != RESPONSES:
            raise GatewayError(400, f"Counting input tokens ({INPUT_TOKENS}) needs a backend that speaks the "
                                    f"Responses API; the model '{model}' is served on {PATHS[res.mode]} only",
                               param="model", code="unsupported_api")
        return RESPONSES


class MessagesCount(ApiCall):
    """Anthropic's `POST /v1/messages/count_tokens`: counted by a Messages backend as it is; for a model on
    another API the sidecar's estimate answers, marked (Need.ESTIMATE_COUNT), once the request is checked."""

    call = Call.COUNT

    def __init__(self) -> None:
        super().__init__(MESSAGES)

    def translator(self, side: RequestSide, body: dict[str, Any], model: str, res: Resolution,
                   upstream_api: str, learned: Learned | None) -> TranslatorPair | None:
        return None  # counted on the model's own API, or estimated

    def send(self, side: RequestSide, call: Resolved) -> Handled:
        plan = call.plan(side, side.target_for(call.res, call.body))
        if Need.ESTIMATE_COUNT in plan.needs:
            count = orjson.dumps({"input_tokens": estimated_input_tokens(call.body)})
            return answer(200, count, headers=((ESTIMATED_HEADER, "true"),))
        return side.route(plan)


# The paths with a handler of their own (checked before the `/v1/responses/{id}` and Conversations
# patterns; `compact` and `input_tokens` match the first); a family added to `api.PATHS` gets an `ApiCall`.
_HANDLERS: dict[str, PathHandler] = {**{path: ApiCall(api) for path, api in API_OF_PATH.items()},
                                     PATHS[RESPONSES]: ResponsesCall(), compact.PATH: Compact(),
                                     INPUT_TOKENS: CountTokens(), COUNT_TOKENS: MessagesCount(),
                                     "/v1/models": ModelList()}
_RESOURCE, _CONVERSATIONS, _PASS_ON = Resource(), ConversationCall(), PassOn()


def handler_for(bare: str) -> PathHandler:
    """The handler of a path (query string removed)."""
    if bare in _HANDLERS:
        return _HANDLERS[bare]
    if rec.RESOURCE_RE.match(bare):
        return _RESOURCE
    return _CONVERSATIONS if conversations.route(bare) is not None else _PASS_ON


class RequestSide:
    def __init__(self, gw: Gateway, tenant: str | None = None, member: Target | None = None,
                 envoy_counts: bool = False):
        self.gw = gw
        self.envoy_counts = envoy_counts  # given: Envoy's access log may count this request (the client's exchange)
        self.tenant = tenant  # given: the caller's, when the request carries another key (a first-contact retry)
        self.member = member  # given: one attempt of a model group's request, on this member and instance
        self.handover: failover.HandedOver | None = None  # sent to its model group's attempts (exchange/failover.py)
        self.headers: dict[str, str] = {}
        self.method = ""
        self.path = ""
        self.model: str | None = None
        self.plan: Plan | None = None  # set once the request is routed
        self.handler: PathHandler = _PASS_ON
        self.pinning = Pinning(gw, {}, tenant)

    @property
    def bare(self) -> str:
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    @property
    def client_api(self) -> str | None:
        return self.handler.client_api

    def on_headers(self, headers: dict[str, str], end_of_stream: bool) -> Decision[Action]:
        self.headers = headers
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        check_request_line(self.method, self.path, has_body=not end_of_stream)
        self.pinning = Pinning(self.gw, headers, self.tenant)
        self.handler = handler_for(self.bare)
        return (yield from decided(self.handler.on_headers(self, end_of_stream)))

    def on_body(self, raw: bytes) -> Decision[Action]:
        if self.plan is not None:  # already routed from its headers (POST /v1/responses/{id}/cancel)
            return Action()
        limit = self.gw.config.limits.max_body_bytes
        if len(raw) > limit:
            raise GatewayError(413, f"request body of {len(raw)} bytes exceeds the gateway limit of {limit} bytes",
                               code="request_too_large")
        return (yield from decided(self.handler.on_body(self, raw)))

    # -- what the handlers share ------------------------------------------------------------------

    def pass_on(self) -> Action:
        """To the default backend: a request with nothing to route by."""
        b = self.gw.default_backend
        target = self.gw.target(b, placement_key({}, self.headers))
        return self.route(Plan(target, self.pinning, needs=passed_on(b)))

    def model_of(self, body: dict[str, Any]) -> tuple[str, Backend]:
        """The body's `model`, and the backend that serves it."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required and must be a non-empty string", param="model",
                               code="invalid_value" if "model" in body else "missing_required_parameter")
        check_model_name(model)  # no control characters, at most 256 bytes (routing/model_name.py)
        self.model = model
        backend = self.member.backend if self.member is not None else self.gw.classifier.backend_for(model)
        if backend is None:
            raise GatewayError(404, f"The model '{model}' does not exist or no backend serves it",
                               param="model", code="model_not_found")
        return model, backend

    def learned(self, backend: Backend, model: str, call: Call = Call.CREATE) -> Decision[Learned | None]:
        """What is known of the API of a model whose backend did not declare it (and, for a compact, of
        the backend's compact endpoint): this replica's copy, else what the other replicas learned (a
        store outage is not remembered as "nothing learned")."""
        if backend.api not in (AUTO, BOTH) and call is not Call.COMPACT:
            return None
        learned = self.gw.knowledge.learned(backend.name, model, self.gw.clock())
        if learned is None:
            values = yield Reads((learned_key(backend.name, model),))
            learned = Learned.loads(values[0] if values else None)
            if values is not None:
                remember(self.gw, backend.name, model, learned)
        return learned

    def resolve(self, model: str, learned: Learned | None) -> Resolution:
        override = self.headers.get(MODE_HEADER) if self.gw.config.discovery.allow_mode_header else None
        if self.member is not None:
            return self.gw.classifier.resolve_on(self.member.backend, model, override=override, learned=learned)
        res = self.gw.classifier.resolve(model, override=override, learned=learned)
        assert res is not None
        return res

    def target_for(self, res: Resolution, body: dict[str, Any]) -> Target:
        if self.member is not None and res.backend is self.member.backend:  # Envoy chose the instance
            return self.member
        return self.gw.target(res.backend, placement_key(body, self.headers))

    def follow(self, follow: background.Follow, writes: Writes | None = None) -> Action:
        """A background response's stream: to the sidecar's front door, which reads its event log
        (`front/follow.py`), with the sealed ticket that names it; nothing else is routed by."""
        return Action(set_headers=[(H_FOLLOW, follow.ticket(self.gw.sealer))], writes=writes or [],
                      remove_headers=(*ROUTING_HEADERS, H_FIRST_CONTACT),
                      clear_route_cache=True, done=True)

    def route(self, plan: Plan, body: dict[str, Any] | None = None) -> Action:
        """The request's plan, final; Envoy's routing for it: routing headers, the rewritten path and body."""
        self.plan = plan
        target = plan.target
        if (unserved := target.backend.unserved()) is not None:  # a missing key or no instances yet
            raise GatewayError(503, unserved.message, code=unserved.code)
        path = self.path
        if plan.pair is not None:  # Anthropic's query (`?beta=true`) means nothing to another API, nor theirs to it
            keep_query = "?" in self.path and MESSAGES not in (plan.pair.client_api, plan.pair.upstream_api)
            path = PATHS[plan.pair.upstream_api] + ("?" + self.query if keep_query else "")
        up = plan.upstream_api  # each API's key header (and Anthropic's version), the client's key moved to it
        headers = target.headers(up) + target.client_credentials(self.headers, plan.client_api, up)
        headers += mark(plan)
        check_key_path(target.backend, self.method, path)  # the key only where it belongs (routing/key_paths.py)
        path = upstream_path(target.backend, path, plan.model)  # its prefix, or a provider's own shape
        body = with_deployment(target.backend, body, plan.request)
        if path != self.path:
            headers.append((":path", path))
        setting = {k for k, _ in headers}
        remove = tuple(h for h in (*ROUTING_HEADERS, H_FIRST_CONTACT, MODE_HEADER) if h not in setting)
        remove += target.foreign_credentials(up)  # the client's credential in the header the key does not go in
        raw = None
        if body is not None:
            raw = orjson.dumps(body)
            headers.append(("content-length", str(len(raw))))
        if body is not None or target.backend.api_key:  # translated answers, and those the key guard reads
            headers.append(("accept-encoding", "identity"))  # (exchange/key_guard.py), must arrive readable
        return Action(set_headers=headers, remove_headers=remove, body=raw, clear_route_cache=True,
                      done=not plan.watches_answer)
