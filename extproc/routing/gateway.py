"""Where a request goes: the backend serving its model and, for multi-instance backends, the instance.

Built once per config (rings are precomputed); look-ups are pure and cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.api import AUTO, BOTH, MESSAGES, RESPONSES
from extproc.config import Backend, Config
from extproc.envoy.names import H_BACKEND, H_CLUSTER, H_ENDPOINT, SESSION_HEADERS
from extproc.routing.classify import Classifier
from extproc.routing.failover import Health
from extproc.routing.modes import Knowledge
from extproc.routing.providers import ANTHROPIC_VERSION, credential_header, envoy_holds_key
from extproc.routing.ring import HashRing
from extproc.state.tenancy import Tenants
from extproc.translate.compact import Sealer, derive_key


def backend_cluster(backend: Backend) -> str:
    """The Envoy cluster a backend's requests go to when no instance is picked: the one named by
    `cluster:`, else the one the sidecar compiles for it (a `url:` backend, the fast path's instances)."""
    return backend.cluster or f"llm.{backend.name}"


@dataclass(frozen=True)
class Target:
    backend: Backend
    endpoint: str | None  # ip:port for endpoint backends, None for Envoy-cluster backends
    # An attempt in a model group's cluster (routing/group_routes.py): it sets no provider's Host and
    # holds no key, so for a `url:` member the processor puts on its Host, its extras and its key.
    grouped: bool = False

    @property
    def envoy_adds_key(self) -> bool:
        """Envoy, not the processor, puts the backend's key on: a `url:` backend's own cluster does."""
        return envoy_holds_key(self.backend) and not self.grouped

    def speaks_messages(self, api: str | None) -> bool:
        """Whether the request goes out on Anthropic's API: `api` is the request's upstream API (a model
        of an `auto` backend may be a Messages one), else the backend's declared one."""
        return (api or self.backend.api) == MESSAGES

    def headers(self, api: str | None = None) -> list[tuple[str, str]]:
        """Routing headers for this target (the caller removes the others), with the backend's key in the
        header the request's upstream API (`api`) reads it from."""
        out = [(H_BACKEND, self.backend.name)]
        if self.endpoint is not None:
            out.append((H_ENDPOINT, self.endpoint))
        else:
            out.append((H_CLUSTER, backend_cluster(self.backend)))
        if self.speaks_messages(api):  # Anthropic's version header (the only version there is)
            out.append(("anthropic-version", ANTHROPIC_VERSION))
        if self.grouped and self.backend.hosted is not None:
            out += [(":authority", self.backend.hosted.authority), *((k.lower(), v) for k, v in self.backend.hosted.headers)]
        if not self.envoy_adds_key and (credential := credential_header(self.backend, api)) is not None:
            out.append(credential)
        return out

    def client_credentials(self, client: dict[str, str], client_api: str | None,
                           api: str | None = None) -> list[tuple[str, str]]:
        """A backend the sidecar holds no key for gets the client's key in the header its API reads it
        from, when the client speaks the other family: an OpenAI client's bearer token as a Messages
        backend's `x-api-key`, an Anthropic client's `x-api-key` as an OpenAI backend's bearer token."""
        messages = self.speaks_messages(api)
        if self.backend.api_key or client_api is None or (client_api == MESSAGES) == messages:
            return []
        scheme, _, token = client.get("authorization", "").partition(" ")
        if messages and "x-api-key" not in client and scheme.lower() == "bearer" and token:
            return [("x-api-key", token.strip())]
        key = client.get("x-api-key", "")
        if not messages and "authorization" not in client and key:
            return [("authorization", "Bearer " + key)]
        return []

    def foreign_credentials(self, api: str | None = None) -> tuple[str, ...]:
        """The client's credential headers that must not reach a backend the processor adds the key for:
        the ones its own key is not sent in (a Messages backend takes `x-api-key`, the others `authorization`;
        Envoy removes both for the `url:` backends whose key it holds)."""
        credential = None if self.envoy_adds_key else credential_header(self.backend, api)
        if credential is None:
            return ()
        return tuple(h for h in ("authorization", "x-api-key") if h != credential[0])


def placement_key(body: dict[str, Any], headers: dict[str, str]) -> str:
    """The stable key that places a first turn, so related requests share a backend's prefix cache."""
    for field in ("prompt_cache_key", "user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return value
    for header in SESSION_HEADERS:
        value = headers.get(header)
        if value:
            return value
    return os.urandom(8).hex()


class Gateway:
    """Everything derived from one config that requests consult."""

    def __init__(self, config: Config, knowledge: Knowledge | None = None,
                 clock: Callable[[], float] = time.monotonic, tenant_secret: bytes = b"",
                 health: Health | None = None):
        self.config = config
        # Each backend's standing in its model groups (routing.failover): outlives a reload, takes its settings.
        self.health = health or Health()
        self.health.settings = config.failover
        self.tenant_secret = tenant_secret  # outlives a reload, like knowledge
        self.tenants = Tenants(config.tenancy, tenant_secret)
        self.sealer = Sealer(derive_key(tenant_secret))  # compaction items the sidecar makes for chat backends
        self.knowledge = knowledge or Knowledge()  # outlives a config reload
        self.clock = clock
        self.classifier = Classifier(config, self.knowledge)
        self.rings = {
            b.name: HashRing([(e.address, e.weight) for e in b.endpoints], vnodes=b.vnodes)
            for b in config.backends if b.endpoints
        }
        self.default_backend = config.backends[0]
        # Where a /v1/responses/{id} request with no record goes (by ring position of the id).
        self.responses_backend = next((b for b in config.backends if b.api in (RESPONSES, BOTH)), None)
        # Where POST /v1/conversations goes (it names no model): the one backend that holds them, if any.
        self.conversations_backend = next((b for b in config.backends if b.holds_conversations), None)

    def target(self, backend: Backend, key: str) -> Target:
        ring = self.rings.get(backend.name)
        return Target(backend, ring.lookup(key) if ring is not None else None)

    def model_list(self) -> list[dict[str, Any]]:
        """Models named exactly in the config or listed by a backend's /v1/models, each with its mode and
        backend, in the OpenAI list shape."""
        seen: dict[str, dict[str, Any]] = {}
        for b in self.config.backends:
            names = [n for n in b.models if not any(c in n for c in "*?[")]
            names += [n for n in self.knowledge.discovered.get(b.name, ()) if self.classifier.backend_for(n) is b]
            for name in names:
                res = self.classifier.resolve(name, learned=self.knowledge.learned(b.name, name, self.clock()))
                if name in seen or res is None:
                    continue
                seen[name] = {"id": name, "object": "model", "created": 0, "owned_by": b.name,
                              "mode": res.mode if res.mode != AUTO else "unknown", "backend": b.name}
        return list(seen.values())
