"""What the request side decided, once: where the request goes and what its answer needs (sans-IO)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from extproc.exchange.actions import Writes
from extproc.routing.gateway import Gateway, Target
from extproc.routing.modes import LOCAL_TTL, Learned, learned_key
from extproc.routing.needs import Needs, watches
from extproc.state.conversations import Held
from extproc.state.pinning import Pinning, PinWrites, response_pin
from extproc.translate.pairs import TranslatorPair

log = logging.getLogger("extproc")


class ModelFacts:
    """What this exchange may learn about its model's API, merged into what replicas already knew."""

    def __init__(self, gw: Gateway, backend: str, model: str, client_api: str, known: Learned | None):
        self.gw, self.backend, self.model, self.client_api = gw, backend, model, client_api
        self.known = known or Learned()
        self.ttl = gw.config.state.learn_ttl_seconds

    def answered(self) -> Writes:
        self.known.ok.add(self.client_api)
        return self._record()

    def needs(self, api: str) -> Writes:
        self.known.mode = api
        self.known.ok.discard(self.client_api)
        return self._record()

    def lacks(self, path: str) -> Writes:
        """The backend answered 404 for this endpoint of the model's API (its compact endpoint)."""
        self.known.lacks.add(path)
        return self._record()

    def _record(self) -> Writes:
        remember(self.gw, self.backend, self.model, self.known)
        return [(learned_key(self.backend, self.model), self.known.dumps())]


def remember(gw: Gateway, backend: str, model: str, learned: Learned) -> None:
    """A replica's own copy, never trusted longer than the shared record lives."""
    ttl = min(LOCAL_TTL, gw.config.state.learn_ttl_seconds)
    gw.knowledge.remember(backend, model, learned, gw.clock(), ttl)


@dataclass(slots=True)
class Turn:
    """The input of a translated Responses turn, kept with its answer."""

    items: list[dict[str, Any]]
    ancestors: list[str]


@dataclass(frozen=True, slots=True)
class Plan:
    """Where the request goes and what its answer needs (`routing.needs`, with the data each need
    uses): decided once, by the request side."""

    target: Target
    pinning: Pinning  # the request's state decisions, and its tenant
    client_api: str | None = None  # None: not an API path, passed on as it is
    model: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    needs: Needs = frozenset()
    pair: TranslatorPair | None = None  # Need.TRANSLATE: translated both ways
    stream: bool = False
    facts: ModelFacts | None = None  # Need.LEARN: the model's API is unknown, learned from the answer
    turn: Turn | None = None  # Need.KEEP_TURN: the translated answer kept as a turn
    pinned_id: str | None = None  # routed by a pin: a lost instance is explained
    conversation: Held | None = None  # Need.CONVERSATION: the answer appended to the conversation it continues
    pins: PinWrites = response_pin  # Need.RECORD_ID: what the answer's id is pinned as (a conversation's own key)
    envoy_counts: bool = False  # Need.COUNT_USAGE left to Envoy's access log (routing.needs.envoy_counts)
    forgets: Writes = field(default_factory=list)  # removed once the backend answers 2xx: a deleted conversation's pin

    @property
    def watches_answer(self) -> bool:
        return watches(self.needs, self.pinned_id is not None, self.envoy_counts)

    @property
    def upstream_api(self) -> str | None:
        return self.pair.upstream_api if self.pair is not None else self.client_api

    @property
    def dropped_tools(self) -> list[str]:
        """Hosted tools removed for a chat backend."""
        return self.pair.dropped_tools if self.pair is not None else []

    def notes(self) -> list[tuple[str, str]]:
        """Response headers that tell the client what translation changed."""
        notes = [("x-gateway-dropped-tools", ",".join(self.dropped_tools))] if self.dropped_tools else []
        if self.pair is not None and self.pair.dropped_fields:  # fields the upstream API has no place for
            notes.append(("x-gateway-dropped-fields", ",".join(self.pair.dropped_fields)))
        return notes

    def learned_ttl(self, writes: Writes) -> int | None:
        """The TTL of learned-fact writes (None: no such writes, the store's default)."""
        return self.facts.ttl if writes and self.facts is not None else None

    def answered(self, response: dict[str, Any] | None) -> Writes:
        """What a finished Response (translated, or read from a passed-through answer) is kept as: the
        sidecar's turn, and the conversation's new items."""
        writes = [] if self.turn is None else \
            self.pinning.turn_writes(response, self.turn.items, self.turn.ancestors, self.target.endpoint,
                                     self.target.backend.name)
        if self.conversation is not None:
            writes += self.conversation.append(response)
        return writes
