"""Which backend serves a model, which API the model answers on, and so which API to send upstream.

Sans-IO: built once from the config, then pure look-ups on the hot path (exact names in dicts,
globs compiled to one regex each).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Generic, TypeVar

from extproc.api import API_MODES, AUTO, BOTH, CHAT, MESSAGES
from extproc.config import Backend, Config, ModelRule
from extproc.routing.catalogue import CATALOGUE
from extproc.routing.modes import Knowledge, Learned


@dataclass(frozen=True)
class Resolution:
    backend: Backend
    mode: str  # what the model answers on at this backend: chat | responses | both
    source: str  # which rule decided the mode, for logs and `extproc resolve`
    translate: bool  # whether translation is allowed for this model
    learning: bool = False  # only the backend's declaration decided: watch the answer to learn

    def upstream_api(self, client_api: str) -> str | None:
        """The client's own API when the model speaks it, else the other one; None when not allowed. A
        Messages client reaches a model of either OpenAI API (or of unknown API) on Chat Completions."""
        if client_api == MESSAGES and self.mode in (BOTH, AUTO):
            return CHAT if self.translate else None
        if self.mode in (BOTH, AUTO, client_api):
            return client_api
        return self.mode if self.translate else None


T = TypeVar("T")


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class _Matcher(Generic[T]):
    """Exact names first, then globs in order; the first match wins."""

    def __init__(self, entries: list[tuple[str, T]]):
        self.exact: dict[str, T] = {}
        self.globs: list[tuple[re.Pattern[str], T]] = []
        for pattern, value in entries:
            if is_glob(pattern):
                self.globs.append((re.compile(fnmatch.translate(pattern)), value))
            else:
                self.exact.setdefault(pattern, value)

    def find(self, name: str) -> T | None:
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        for rx, value in self.globs:
            if rx.match(name):
                return value
        return None


class Classifier:
    def __init__(self, config: Config, knowledge: Knowledge | None = None):
        self.config = config
        self.knowledge = knowledge or Knowledge()
        self._backends = _Matcher([(p, b) for b in config.backends for p in b.models])
        self._labels = _Matcher([(p, p) for b in config.backends for p in b.models])
        self._rules = _Matcher([(r.match, (i, r)) for i, r in enumerate(config.model_rules)])
        self._catalogue = _Matcher([(p, (p, mode)) for p, mode in CATALOGUE])

    def backend_for(self, model: str) -> Backend | None:
        return self._backends.find(model)

    def label_for(self, model: str | None) -> str:
        """The configured name or pattern a model matched, else `unknown`: a metric label that a client
        cannot grow by sending new model names."""
        return (self._labels.find(model) if model else None) or "unknown"

    def resolve(self, model: str, *, override: str | None = None, learned: Learned | None = None) -> Resolution | None:
        """Highest first: override header, model_rules, learned, the upstream's /v1/models, the built-in
        catalogue, the backend's declared api. The last three only for backends declared auto or both."""
        backend = self._backends.find(model)
        if backend is None:
            return None
        return self.resolve_on(backend, model, override=override, learned=learned)

    def resolve_on(self, backend: Backend, model: str, *, override: str | None = None,
                   learned: Learned | None = None) -> Resolution:
        """The decision for `model` on a given backend: another member of its group (routing.groups), by
        the same rules as the backend the model resolves to (`learned` is that backend's fact)."""
        return combine(backend, self._rules.find(model), self._catalogue.find(model),
                       self.knowledge.discovered_mode(backend.name, model), learned, override)


def combine(backend: Backend, rule_hit: tuple[int, ModelRule] | None, catalogue_hit: tuple[str, str] | None,
            discovered: str | None, learned: Learned | None, override: str | None = None) -> Resolution:
    """The decision from what matched a model name: also used by the route compiler (routing.compile) for
    whole glob patterns, so Envoy's routes and the processor cannot disagree."""
    translate = backend.translate
    mode, source = backend.api, f"backend {backend.name} api"
    open_api = backend.api in (AUTO, BOTH)
    if open_api:
        # A Claude name says Messages only of a backend nobody described: one declared `both` speaks OpenAI's.
        if catalogue_hit is not None and (catalogue_hit[1] != MESSAGES or backend.api == AUTO):
            mode, source = catalogue_hit[1], f"built-in catalogue {catalogue_hit[0]!r}"
        if discovered is not None:
            mode, source = discovered, f"backend {backend.name} /v1/models"
        if learned is not None and learned.mode is not None:
            mode, source = learned.mode, f"learned from a {backend.name} rejection"
    if rule_hit is not None:
        i, rule = rule_hit
        if rule.mode is not None:
            mode, source = rule.mode, f"model_rules[{i}] {rule.match!r}"
        if rule.translate is not None:
            translate = rule.translate
    if override in API_MODES:
        mode, source = override, "x-gateway-model-mode header"
    return Resolution(backend=backend, mode=mode, source=source, translate=translate,
                      learning=open_api and source == f"backend {backend.name} api")
