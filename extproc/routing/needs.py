"""What a request needs, decided once: the processor's plan and Envoy's fast routes both read it (sans-IO).

`needs(config, resolution, facts, learned)` maps the model's resolution (`Classifier.resolve`, with the
mode header's override when it is honoured) and the request facts Envoy can also see (`Facts`: the
client API and call, the body fields json_to_metadata reads, two headers) to a frozen set of `Need`s.
Envoy alone can route a request to its backend and count the usage its answer reports (`envoy_can`):
a request takes the fast path exactly when its needs are a subset of that (`is_fast`). The route
compiler (`routing.compile`) asks `survey` for every `Facts` a client API can have, so its routes are
this function's answers; `decide` there (and `extproc resolve`) reads the same survey.

How the processor uses it (`exchange/request.py`), once it has the resolution and the body:

    n = needs(config, res, Facts.of(client_api, call, body, headers), learned)
    Need.TRANSLATE in n        -> a translator pair (for a compact on a chat backend, CompactOnChat)
    Need.LEARN in n            -> ModelFacts: learn the model's API from the answer (first contact)
    Need.COMPACT_FALLBACK in n -> sent where Envoy retries a 404 of the compact endpoint as a
                                  compaction_trigger turn (exchange/first_contact.py); once the backend
                                  is known to lack it, Need.TRANSLATE: the turn is sent at once
    Need.RECORD_ID in n        -> response.Observe's IdRecorder: pin the stored answer's id to its instance
    Need.KEEP_TURN in n        -> Plan.turn: the sidecar keeps the translated turn
    n & USAGE                  -> response.Observe's UsageScanner: read (or estimate) an untranslated answer's usage,
                                  unless `envoy_counts(n)` (and the exchange is the client's): then Envoy's
                                  access log counts it, as for the fast path (Plan.envoy_counts)
    Need.INJECT_KEY in n       -> the backend's key is added; an error quoting it is scrubbed
    Need.PROVIDER_SHAPE in n   -> providers.upstream_path / with_deployment: a provider's own paths and names
    Need.CONTINUE in n         -> state.pinning finds the conversation (a pin may then need explaining)
    Need.CONVERSATION in n     -> state.conversations reads it as the history; Plan.conversation: the
                                  answer's Response (translated, or read on the way) appended to it
    Need.ESTIMATE_COUNT in n   -> the sidecar answers a Messages token count with its estimate
    n & REFUSALS               -> the processor's own checks answer it (415, 404, 400, 503): nothing else
    watches(n, pinned)         -> Plan.watches_answer: whether the exchange reads the answer at all
A request the processor passes on without an API decision (another path, `/v1/responses/{id}`) has
`passed_on(backend)`. The call's own rules (a count neither learns nor counts usage, only a create
keeps a turn) are here, under `Facts.call`, rather than in per-call flags on the request side.
tests/unit/test_one_decision.py drives every kind of model and every Facts through the processor and
through Envoy's compiled routes, and holds both to this function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from itertools import product
from typing import Any

from extproc.api import CHAT, MESSAGES, RESPONSES
from extproc.config import Backend, Config
from extproc.envoy.names import MODE_HEADER
from extproc.routing.classify import Resolution
from extproc.routing.modes import Learned
from extproc.routing.providers import envoy_holds_key, processor_only


class Call(StrEnum):
    """Which POST of an API a request is: only CREATE makes a turn, and only CREATE has fast routes."""

    CREATE = "create"  # /v1/chat/completions, /v1/responses, /v1/messages
    COMPACT = "compact"  # /v1/responses/compact: summarised on chat-only backends
    COUNT = "count"  # /v1/responses/input_tokens, /v1/messages/count_tokens: counted on the model's own API


class Need(Enum):
    """One thing a request needs done. Listed in the order `explain` prefers for a model's reason."""

    COMPRESSED = "compressed"  # refused: a compressed body (415)
    NO_BACKEND = "no_backend"  # refused: no backend serves the model (404)
    UNSUPPORTED_API = "unsupported_api"  # refused: the model is not served on the client's API, untranslated (400)
    UNAVAILABLE = "unavailable"  # refused: the backend cannot serve yet (503)
    TRANSLATE = "translate"  # the request and its answer translated between the two APIs
    SIDECAR_CALL = "sidecar_call"  # a compact or an input-token count: the sidecar checks (or serves) it
    ESTIMATE_COUNT = "estimate_count"  # a Messages token count for a model on another API: the sidecar's estimate
    LEARN = "learn"  # the model's API is learned from the answer
    COMPACT_FALLBACK = "compact_fallback"  # a compact whose 404 Envoy retries as a compaction_trigger turn
    ROUTE = "route"  # sent to the model's backend
    INJECT_KEY = "inject_key"  # the backend's API key added (and scrubbed from errors that quote it)
    PROVIDER_SHAPE = "provider_shape"  # a provider's own paths or deployment names (Azure's), set by the processor
    MODE_OVERRIDE = "mode_override"  # the client's x-gateway-model-mode header honoured
    CONTINUE = "continue"  # a previous_response_id: the conversation is found (pin, held turns)
    CONVERSATION = "conversation"  # a `conversation`: the sidecar holds it (its items the history, the answer appended)
    RECORD_ID = "record_id"  # a stored answer from a Responses backend: its id pinned to the instance
    KEEP_TURN = "keep_turn"  # a stored turn of a translated conversation: the sidecar keeps it
    ESTIMATE_USAGE = "estimate_usage"  # usage of an answer that reports none (a chat stream without include_usage)
    COUNT_USAGE = "count_usage"  # usage the answer reports, counted


Needs = frozenset[Need]

REFUSALS: Needs = frozenset({Need.COMPRESSED, Need.NO_BACKEND, Need.UNSUPPORTED_API, Need.UNAVAILABLE})
USAGE: Needs = frozenset({Need.COUNT_USAGE, Need.ESTIMATE_USAGE})
# What only the answer can satisfy: with none of these (and no pin used), the processor lets go at once.
ANSWER: Needs = frozenset({Need.TRANSLATE, Need.LEARN, Need.RECORD_ID, Need.KEEP_TURN, Need.CONVERSATION,
                           Need.INJECT_KEY}) | USAGE


@dataclass(frozen=True)
class Facts:
    """What Envoy can also see of a request: its API path and the request fields and headers the compiled
    routes match on (routing.compile maps each boolean to a metadata or header matcher)."""

    client_api: str
    call: Call = Call.CREATE
    stream: bool = False  # `stream` is true
    include_usage: bool = False  # `stream_options.include_usage` is true
    stored: bool = True  # `store` is anything but false (Responses stores by default)
    previous_response_id: bool = False
    conversation: bool = False
    content_encoding: bool = False  # a compressed body (Envoy sees the header; the processor its value)
    mode_header: bool = False  # x-gateway-model-mode is sent

    @classmethod
    def of(cls, client_api: str, call: Call, body: Mapping[str, Any], headers: Mapping[str, str]) -> Facts:
        """The facts of a parsed request, read as the processor acts on them."""
        options = body.get("stream_options")
        return cls(client_api, call, stream=body.get("stream", False) is True,
                   include_usage=isinstance(options, dict) and options.get("include_usage") is True,
                   stored=body.get("store") is not False,
                   previous_response_id=body.get("previous_response_id") is not None,
                   conversation=body.get("conversation") is not None,
                   content_encoding=headers.get("content-encoding", "identity").strip().lower() != "identity",
                   mode_header=headers.get(MODE_HEADER) is not None)


# The boolean facts, in their order in Facts, which the compiler enumerates.
FACT_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Facts) if f.name not in ("client_api", "call"))


def needs(config: Config, res: Resolution | None, facts: Facts, learned: Learned | None = None) -> Needs:
    """Everything this request needs. A refusal is the whole answer: the processor's checks answer it, in
    the order they run (the body's encoding, the model, its API; the backend's readiness last, after a
    translator or the state may have refused the request on their own grounds)."""
    if facts.content_encoding:
        return frozenset({Need.COMPRESSED})
    if res is None:
        return frozenset({Need.NO_BACKEND})
    client = facts.client_api
    upstream = res.upstream_api(client)
    if upstream is None or (facts.call is Call.COUNT and upstream != client and client != MESSAGES):
        return frozenset({Need.UNSUPPORTED_API})  # only a Responses backend counts Responses input
    if facts.call is Call.COUNT and upstream != client:  # Anthropic's count, for a model on another API
        return frozenset({Need.SIDECAR_CALL, Need.ESTIMATE_COUNT})
    if res.backend.unserved() is not None:
        return frozenset({Need.UNAVAILABLE})
    out = {Need.ROUTE}
    if upstream != client:
        out.add(Need.TRANSLATE)
    elif facts.call is Call.COMPACT and client == RESPONSES and not res.learning:
        # The dedicated endpoint, retried as a compaction_trigger turn when it is missing; the turn at
        # once (translated: another path, the answer reshaped) where the backend is known to lack it.
        out.add(Need.TRANSLATE if learned is not None and learned.lacks_compact else Need.COMPACT_FALLBACK)
    translated = Need.TRANSLATE in out
    if facts.call is not Call.CREATE:
        out.add(Need.SIDECAR_CALL)
    # A count teaches nothing about the model's API (a backend may serve Responses but not counting), and a
    # model's API is learned from OpenAI clients only (a Messages client's request goes out as chat).
    if res.learning and client not in (learned.ok if learned else ()) and facts.call is not Call.COUNT \
            and client != MESSAGES:
        out.add(Need.LEARN)
    if processor_adds_key(res.backend):
        out.add(Need.INJECT_KEY)
    if processor_only(res.backend) is not None:
        out.add(Need.PROVIDER_SHAPE)
    if facts.mode_header and config.discovery.allow_mode_header:
        out.add(Need.MODE_OVERRIDE)
    if client == RESPONSES:
        if facts.previous_response_id:
            out.add(Need.CONTINUE)
        if facts.conversation:
            out.add(Need.CONVERSATION)
        if facts.stored and facts.call is Call.CREATE:
            out.add(Need.KEEP_TURN if translated else Need.RECORD_ID)
    if not translated and config.usage_accounting == "all" and facts.call is not Call.COUNT:
        # A translator counts its own answers; a chat stream reports usage only when asked to (Responses
        # and Messages streams always do).
        reported = client != CHAT or not facts.stream or facts.include_usage
        out.add(Need.COUNT_USAGE if reported else Need.ESTIMATE_USAGE)
    return frozenset(out)


def retried_by_envoy(n: Needs) -> bool:
    """Whether the request goes where Envoy can retry it once (the first-contact cluster): a model of
    unknown API (retried on the other API; a compact's rejection teaches it, but a compact has no other
    API to be retried on), or a compact whose endpoint may be missing."""
    return Need.COMPACT_FALLBACK in n or (Need.LEARN in n and Need.SIDECAR_CALL not in n)


def processor_adds_key(backend: Backend) -> bool:
    """The sidecar's key goes with the request only if the processor adds it: Envoy holds the keys of
    `url:` backends (SDS secrets, injected by their clusters), on the fast path and the processor's alike."""
    return backend.keyed and not envoy_holds_key(backend)


def passed_on(backend: Backend) -> Needs:
    """A request sent to a backend without an API decision (another path, a `/v1/responses/{id}`)."""
    return frozenset({Need.ROUTE, Need.INJECT_KEY} if processor_adds_key(backend) else {Need.ROUTE})


# What has the processor read a passed-through answer to its end anyway (the key scrubbed from it, the
# conversation's new items, what the answer teaches of the model's API): it counts that answer's usage too.
READ_WHOLE: Needs = frozenset({Need.INJECT_KEY, Need.CONVERSATION, Need.LEARN})


def envoy_counts(n: Needs) -> bool:
    """Whether Envoy can count a processed request's usage, as on the fast path (json_to_metadata,
    sse_to_metadata, the access-log service): usage the answer reports is counted and nothing else makes
    the processor read the answer whole, so it need not read it for the usage."""
    return Need.COUNT_USAGE in n and not n & READ_WHOLE


def watches(n: Needs, pinned: bool, counted_by_envoy: bool = False) -> bool:
    """Whether the exchange must read the answer (`pinned`: routed by a pin, whose loss it explains;
    `counted_by_envoy`: Envoy counts its usage, `envoy_counts`)."""
    return bool((n - {Need.COUNT_USAGE} if counted_by_envoy else n) & ANSWER) or pinned


def envoy_can(config: Config) -> Needs:
    """What Envoy does alone on a compiled fast route: route to the backend (with `fast_path` on), and
    count the usage an answer reports (json_to_metadata, sse_to_metadata, the access-log service)."""
    return frozenset({Need.ROUTE, Need.COUNT_USAGE}) if config.fast_path else frozenset()


def is_fast(config: Config, n: Needs) -> bool:
    return n <= envoy_can(config)


# -- over every Facts: what the compiler and `extproc resolve` read ----------------------------------

Condition = tuple[tuple[str, bool], ...]  # (fact name, value) pairs that must all hold


@dataclass(frozen=True)
class Survey:
    """One model's requests on one client API, over every Facts of a create call."""

    when: tuple[Condition, ...]  # the fast path, as few alternatives as cover it exactly; () never
    plain: Needs  # what the plainest request needs: every fact false (store: false, no stream, ...)
    sometimes: Needs  # what any of them needs


def survey(config: Config, res: Resolution | None, client_api: str, learned: Learned | None = None) -> Survey:
    can = envoy_can(config)
    fast: set[tuple[bool, ...]] = set()
    plain: Needs = frozenset()
    sometimes: set[Need] = set()
    for values in product((False, True), repeat=len(FACT_NAMES)):
        n = needs(config, res, Facts(client_api, Call.CREATE, *values), learned)
        if n <= can:
            fast.add(values)
        if not any(values):
            plain = n
        sometimes |= n
    return Survey(tuple(tuple((FACT_NAMES[i], v) for i, v in enumerate(term) if v is not None)
                        for term in _cover(fast, len(FACT_NAMES))), plain, frozenset(sometimes))


Term = tuple[bool | None, ...]  # None: either value


def _cover(true: set[tuple[bool, ...]], width: int) -> list[Term]:
    """Few terms whose union is exactly `true` (Quine-McCluskey prime implicants, then a greedy cover)."""
    terms: set[Term] = set(true)
    primes: set[Term] = set()
    while terms:
        merged: set[Term] = set()
        used: set[Term] = set()
        for a in terms:
            for i, v in enumerate(a):
                if v is not None and (b := (*a[:i], not v, *a[i + 1:])) in terms:
                    merged.add((*a[:i], None, *a[i + 1:]))
                    used |= {a, b}
        primes |= terms - used
        terms = merged

    def covers(term: Term) -> frozenset[tuple[bool, ...]]:
        return frozenset(m for m in true if all(v is None or v == m[i] for i, v in enumerate(term)))

    # Fewest fixed facts first, so ties in the cover go to the broadest term.
    cover = {t: covers(t) for t in sorted(primes, key=lambda t: (sum(v is not None for v in t), [(v is None, v) for v in t]))}
    left, out = set(true), []
    while left:
        best = max(cover, key=lambda t: len(cover[t] & left))
        out.append(best)
        left -= cover[best]
    return out


# -- reasons, for `extproc resolve` ---------------------------------------------------------------

_WHY = {
    Need.COMPRESSED: "a compressed body (content-encoding: the processor answers 415)",
    Need.NO_BACKEND: "no backend serves this model: the processor answers 404",
    Need.UNSUPPORTED_API: "translation is off for this model: the processor answers 400",
    Need.UNAVAILABLE: "the processor answers 503 {code}",
    Need.TRANSLATE: "translated to the {upstream} API",
    Need.SIDECAR_CALL: "a compact or input-token count, which the sidecar checks",
    Need.ESTIMATE_COUNT: "a token count the model's API cannot make: the sidecar estimates it",
    Need.LEARN: "the model's API is still being learned from the backend's answers",
    Need.COMPACT_FALLBACK: "a compact, retried as a compaction_trigger turn if the backend lacks the endpoint",
    Need.ROUTE: "fast_path is off in the config",
    Need.INJECT_KEY: "the backend has an API key, which only the processor adds (Envoy holds the keys of url: "
                     "backends only)",
    Need.PROVIDER_SHAPE: "the provider's versioned paths or deployment names, which the processor sets",
    Need.MODE_OVERRIDE: "an x-gateway-model-mode header (the processor honours it)",
    Need.CONTINUE: "a previous_response_id (the processor finds the conversation)",
    Need.CONVERSATION: "a conversation (the sidecar holds it: its items are the history, the answer is appended)",
    Need.RECORD_ID: "no store: false (the processor pins the stored answer's id)",
    Need.KEEP_TURN: "no store: false (the sidecar keeps the turn)",
    Need.ESTIMATE_USAGE: "a stream without stream_options.include_usage (the processor estimates its usage)",
    Need.COUNT_USAGE: "usage the answer reports, counted",
}


def ordered(n: Iterable[Need]) -> list[Need]:
    """Needs in `Need`'s order, the one reasons prefer."""
    return sorted(n, key=list(Need).index)


def explain(need: Need, res: Resolution | None, client_api: str) -> str:
    unserved = res.backend.unserved() if res is not None else None
    upstream = res.upstream_api(client_api) if res is not None else None
    return _WHY[need].format(code=unserved.code if unserved else "", upstream=upstream or "")
