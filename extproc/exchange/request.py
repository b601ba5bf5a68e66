"""The request side: request headers and body resolved once into a `Plan` and Envoy's routing (sans-IO).

Order of decisions: the path (an API path, a `/v1/responses/{id}` resource, `/v1/models`, or anything
else, passed on), the body (media type, one strict parse, `model`), the model's backend and API
(learned facts may need a store read), then state (`previous_response_id`, in `state.pinning`), and
last the rewrite and routing headers for Envoy.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

import orjson

from extproc.api import API_OF_PATH, AUTO, BOTH, PATHS, RESPONSES
from extproc.config import Backend
from extproc.errors import GatewayError, invalid
from extproc.exchange.actions import Action, Step, answer
from extproc.exchange.body import check_json_request, is_json, parse_body
from extproc.exchange.paths import INPUT_TOKENS, check_request_line
from extproc.exchange.plan import ModelFacts, Plan, Turn, remember
from extproc.routing.gateway import H_FIRST_CONTACT, ROUTING_HEADERS, Gateway, Target, placement_key
from extproc.routing.modes import Learned, learned_key
from extproc.state import background, conversations
from extproc.state import records as rec
from extproc.state.lookup import Lookup, Values, then
from extproc.state.pinning import Answered, Continuation, Forwarded, Pinning
from extproc.translate import compact, compact_trigger
from extproc.translate.pairs import pair_for

log = logging.getLogger("extproc")

MODE_HEADER = "x-gateway-model-mode"  # per-request mode override, when discovery.allow_mode_header


class Call(StrEnum):
    """Which POST of the Responses API a request is: only CREATE makes a turn the sidecar keeps."""

    CREATE = "create"  # /v1/responses
    COMPACT = "compact"  # /v1/responses/compact: summarised on chat-only backends
    COUNT = "count"  # /v1/responses/input_tokens: only a Responses backend can count


class RequestSide:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.headers: dict[str, str] = {}
        self.method = ""
        self.path = ""
        self.client_api: str | None = None
        self.model: str | None = None
        self.plan: Plan | None = None  # set once the request is routed
        self.call = Call.CREATE
        self.pinning = Pinning(gw, {})
        self.conversation_route: conversations.Route | None = None  # a Conversations API path
        self.background = False  # a background turn the sidecar runs itself (chat models)

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    def on_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        self.headers = headers
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        check_request_line(self.method, self.path, has_body=not end_of_stream)
        self.pinning = Pinning(self.gw, headers)
        bare = self.path.partition("?")[0]
        self.client_api = API_OF_PATH.get(bare)
        if bare in (compact.PATH, INPUT_TOKENS):  # not the resources of responses with ids "compact", "input_tokens"
            self.client_api, self.call = RESPONSES, Call.COMPACT if bare == compact.PATH else Call.COUNT
            return Action()
        self.conversation_route = conversations.route(bare)  # hook (conversations): answered by the sidecar
        if self.conversation_route is not None:
            return self._conversation(None) if end_of_stream else Action()
        resource = rec.RESOURCE_RE.match(bare)
        if resource is not None:
            lookup = self.pinning.resource(self.method, resource.group(1), resource.group(2) or "", self.query)
            return lookup.map(self._resource)
        if not end_of_stream:
            return Action()  # the buffered body comes next; decide there
        if self.method == "GET" and bare == "/v1/models":
            return answer(200, orjson.dumps({"object": "list", "data": self.gw.model_list()}))
        return self._pass_on()  # a body-less request with nothing to route by: the default backend takes it

    def _resource(self, outcome: Answered | Forwarded) -> Action:
        if isinstance(outcome, Answered):
            return answer(outcome.status, outcome.body, outcome.writes)
        return self._route(self._plan(outcome.target, pinned_id=outcome.pinned_id))

    def _conversation(self, body: dict[str, Any] | None) -> Step:
        assert self.conversation_route is not None
        calls = conversations.Conversations(self.pinning.tenant, self.gw.config.state.max_record_bytes)
        return then(calls.call(self.method, self.conversation_route, self.query, body),
                    lambda reply: answer(reply.status, reply.body, reply.writes))

    def _plan(self, target: Target, **kw: Any) -> Plan:
        return Plan(target=target, pinning=self.pinning, client_api=self.client_api,
                    model=self.model, **kw)

    def _pass_on(self) -> Action:
        b = self.gw.default_backend
        return self._route(self._plan(self.gw.target(b, placement_key({}, self.headers))))

    def on_body(self, raw: bytes) -> Step:
        if self.plan is not None:  # already routed from its headers (POST /v1/responses/{id}/cancel)
            return Action()
        limit = self.gw.config.limits.max_body_bytes
        if len(raw) > limit:
            raise GatewayError(413, f"request body of {len(raw)} bytes exceeds the gateway limit of {limit} bytes",
                               code="request_too_large")
        if self.conversation_route is not None:  # hook (conversations): a JSON body, answered by the sidecar
            check_json_request(self.headers)
            return self._conversation(parse_body(raw))
        if self.client_api is None and not is_json(self.headers.get("content-type", "")):
            return self._pass_on()
        check_json_request(self.headers)
        body = parse_body(raw)
        if self.call is Call.COMPACT:
            compact.check_request(body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required and must be a non-empty string", param="model",
                               code="invalid_value" if "model" in body else "missing_required_parameter")
        self.model = model
        backend = self.gw.classifier.backend_for(model)
        if backend is None:
            raise GatewayError(404, f"The model '{model}' does not exist or no backend serves it",
                               param="model", code="model_not_found")
        learned = None
        if backend.api in (AUTO, BOTH) and self.client_api is not None:
            learned = self.gw.knowledge.learned(backend.name, model, self.gw.clock())
            if learned is None:  # not known here lately: what have the other replicas learned?
                return Lookup((learned_key(backend.name, model),),
                              lambda values: self._resolve(body, backend, self._shared_learned(backend, values)))
        return self._resolve(body, backend, learned)

    def _shared_learned(self, backend: Backend, values: Values) -> Learned:
        assert self.model is not None
        learned = Learned.loads(values[0] if values else None)
        if values is not None:  # a store outage is not remembered as "nothing learned"
            remember(self.gw, backend.name, self.model, learned)
        return learned

    def _resolve(self, body: dict[str, Any], backend: Backend, learned: Learned | None) -> Step:
        model = self.model or ""
        override = self.headers.get(MODE_HEADER) if self.gw.config.discovery.allow_mode_header else None
        res = self.gw.classifier.resolve(model, override=override, learned=learned)
        assert res is not None
        target = self.gw.target(res.backend, placement_key(body, self.headers))
        if self.client_api is None:  # another OpenAI path (embeddings, ...): to the backend of its model
            return self._route(self._plan(target, request=body))
        upstream_api = res.upstream_api(self.client_api)
        if self.call is Call.COUNT and upstream_api != RESPONSES:
            raise GatewayError(400, f"Counting input tokens ({INPUT_TOKENS}) needs a backend that speaks the "
                                    f"Responses API; the model '{model}' is served on {PATHS[res.mode]} only",
                               param="model", code="unsupported_api")
        if upstream_api is None:
            path = PATHS[res.mode]
            raise GatewayError(400, f"The model '{model}' is only available on {path}, and translation is turned "
                                    f"off for it: call {path} instead", param="model", code="unsupported_api")
        # A count teaches nothing about the model's API (a backend may serve Responses but not counting).
        learning = res.learning and self.client_api not in (learned.ok if learned else ()) and self.call is not Call.COUNT
        pair = pair_for(self.client_api, upstream_api, body, model, res.backend)
        if self.call is Call.COMPACT and pair is not None:
            pair = compact.CompactOnChat(res.backend, self.gw.sealer, self.pinning.tenant)
        # hook (compaction inside /v1/responses): a trigger last in `input` is compacted on chat backends
        if self.call is Call.CREATE and self.client_api == RESPONSES and compact_trigger.triggered(body) \
                and pair is not None:
            pair = compact_trigger.TriggerOnChat(body, res.backend, self.gw.sealer, self.pinning.tenant)
        # hook (background): on a chat model the sidecar runs it; a Responses backend takes it as sent
        self.background = self.call is Call.CREATE and self.client_api == RESPONSES and \
            background.requested(body, pair is not None)
        plan = self._plan(target, request=body, stream=body.get("stream", False) is True, pair=pair,
                          facts=ModelFacts(self.gw, backend.name, model, self.client_api, learned) if learning else None)
        plan.observe_usage = plan.pair is None and self.gw.config.usage_accounting == "all" and self.call is not Call.COUNT
        if self.client_api != RESPONSES:
            return self._route(plan, plan.pair.request(body) if plan.pair is not None else None)
        if body.get("conversation") is not None:  # hook (conversations): the history is the conversation's
            return self._in_conversation(plan, body, target)
        prev = body.get("previous_response_id")
        if prev is None:
            return self._forward(plan, Continuation(target))
        if not isinstance(prev, str) or not prev:
            raise invalid("previous_response_id", "expected a response id string")
        return then(self.pinning.continue_from(prev, model, res, target, plan.pair is not None),
                    lambda cont: self._forward(plan, cont))

    def _in_conversation(self, plan: Plan, body: dict[str, Any], target: Target) -> Step:
        """A turn in a conversation the sidecar holds: its items are the history, handed to a Responses
        backend as `input` (docs/state.md)."""
        lookup = conversations.Turns(self.pinning.tenant, self.gw.config.state.max_record_bytes).held(body)

        def continued(held: conversations.Held) -> Action:
            plan.request, plan.conversation = {k: v for k, v in body.items() if k != "conversation"}, held
            return self._forward(plan, Continuation(target, prior=held.items))
        return lookup.map(continued)

    def _forward(self, plan: Plan, cont: Continuation) -> Action:
        """A Responses request sent on, a conversation the sidecar kept merged into its input."""
        if self.background:  # hook (background): answered queued now, run by the sidecar's shell
            run = background.Run.start(plan.request, self.pinning.tenant, self.headers, cont.ancestors)
            queued, writes = run.queued()
            return Action(immediate=(200, queued, "application/json"), writes=writes, done=True, background=run)
        body = plan.request
        plan.target, plan.pinned_id = cont.target, cont.pinned_id
        keep = body.get("store") is not False and self.call is Call.CREATE
        opened = compact.open_items(body.get("input"), self.gw.sealer, self.pinning.tenant, plan.pair is not None)
        if opened is not None:  # the sidecar's own compaction items: their summaries instead
            body = {**body, "input": opened}
        # hook (held history): cut to its compacted window, the sidecar's compaction items opened
        prior = compact_trigger.held_context(cont.prior, self.gw.sealer, self.pinning.tenant, plan.pair is not None)
        if plan.pair is not None:
            items = rec.input_items(body.get("input"))
            if keep:
                plan.turn = Turn(items, cont.ancestors)
            if plan.conversation is not None:  # hook (conversations): appended when the answer ends
                plan.conversation.input = items
            merged = {**body, "input": prior + items} if prior else body
            new = plan.pair.request(merged)
            if plan.pair.dropped_tools:
                log.info("model=%s backend=%s: hosted tools dropped: %s", self.model, plan.target.backend.name,
                         ",".join(plan.pair.dropped_tools))
            return self._route(plan, new)
        # A Responses backend keeps its own state: pin the reply's id to the instance that made it.
        plan.record_id = keep  # endpoint backends and clusters alike: GET /v1/responses/{id} must find it
        if prior or plan.conversation is not None:  # the conversation so far was kept by the sidecar: hand it over whole
            items = rec.input_items(body.get("input"))
            if plan.conversation is not None:  # hook (conversations): its answer is read and appended
                plan.conversation.input = items
            new = {k: v for k, v in body.items() if k != "previous_response_id"}
            new["input"] = prior + items
            return self._route(plan, new)
        return self._route(plan, body if opened is not None else None)

    def _route(self, plan: Plan, body: dict[str, Any] | None = None) -> Action:
        """Envoy's routing for the plan: routing headers, the rewritten path and body."""
        self.plan = plan
        target = plan.target
        if (unserved := target.backend.unserved()) is not None:  # a missing key or no instances yet
            raise GatewayError(503, unserved.message, code=unserved.code)
        path = self.path
        if plan.pair is not None:
            path = PATHS[plan.pair.upstream_api] + ("?" + self.query if "?" in self.path else "")
        headers = target.headers()
        if plan.facts is not None and target.endpoint is not None:  # Envoy retries it on the other API if need be
            headers.append((H_FIRST_CONTACT, self.pinning.tenant))
        if target.backend.path_prefix:
            path = target.backend.path_prefix + path
        if path != self.path:
            headers.append((":path", path))
        remove = tuple(h for h in (*ROUTING_HEADERS, H_FIRST_CONTACT, MODE_HEADER) if h not in {k for k, _ in headers})
        raw = None
        if body is not None:
            raw = orjson.dumps(body)
            headers.append(("content-length", str(len(raw))))
            headers.append(("accept-encoding", "identity"))  # translated answers must arrive readable
        return Action(set_headers=headers, remove_headers=remove, body=raw, clear_route_cache=True,
                      done=not plan.watches_answer)

