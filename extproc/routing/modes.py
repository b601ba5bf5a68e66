"""What the sidecar knows about each model's API beyond its config: discovered and learned (sans-IO).

- discovered: what a backend's `/v1/models` says per model (`supported_endpoints`, `mode`, ...);
- learned: what upstream rejections said ("use /v1/responses"), which APIs a model has answered
  on, and which of its API's endpoints the backend lacks for it (a `/v1/responses/compact` answered
  404: the compaction is then asked in the body-signal form, `translate/compact_trigger.py`). Learned facts are shared through the state store (key `mode:<backend>:<model>`) with a TTL, and
  cached here for a short while so the hot path rarely asks the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from extproc.api import API_MODES, BOTH, CHAT, COMPACT_PATH, MESSAGES, RESPONSES, other
from extproc.envoy.names import LEARNABLE_STATUSES

LOCAL_TTL = 30.0  # seconds a replica trusts its own copy of a store record (or of its absence)


LEARNED_PREFIX = "mode:"  # store keys of learned facts: mode:<backend>:<model>


def learned_key(backend: str, model: str) -> str:
    return f"{LEARNED_PREFIX}{backend}:{model}"


class LearnedStore(Protocol):
    async def scan(self, prefix: str) -> list[tuple[str, bytes]]: ...
    async def write(self, writes: list[tuple[str, bytes | None]], ttl: int | None = None) -> None: ...


async def list_learned(store: LearnedStore) -> dict[str, Learned]:
    """Every learned fact in the store, by `backend:model` (the admin port and `extproc learned`)."""
    return {k.removeprefix(LEARNED_PREFIX): Learned.loads(v) for k, v in sorted(await store.scan(LEARNED_PREFIX))}


async def forget_learned(store: LearnedStore, names: list[str], everything: bool = False) -> list[str]:
    """Drop the named `backend:model` facts (or all of them); returns the names that were there."""
    known = await list_learned(store)
    gone = sorted(known) if everything else [n for n in dict.fromkeys(names) if n in known]
    if gone:
        await store.write([(LEARNED_PREFIX + n, None) for n in gone])
    return gone


# -- discovery ------------------------------------------------------------------------------------

def _mode_of(entry: dict[str, Any]) -> str | None:
    endpoints = entry.get("supported_endpoints") or entry.get("endpoints")
    if isinstance(endpoints, list):
        text = " ".join(str(e) for e in endpoints).lower()
        chat = "chat/completions" in text or "chat.completions" in text or "chat_completions" in text
        responses = "responses" in text
        if chat or responses:
            return BOTH if chat and responses else CHAT if chat else RESPONSES
        if "messages" in text:  # Anthropic's API alone (a model on both families is an OpenAI one)
            return MESSAGES
    for key in ("mode", "api", "type"):
        value = entry.get(key)
        if isinstance(value, str) and value in API_MODES:
            return value
    return None


def parse_models(doc: Any) -> dict[str, str | None]:
    """A /v1/models list as {model id: mode, or None when the upstream gives no signal}."""
    data = doc.get("data") if isinstance(doc, dict) else doc
    out: dict[str, str | None] = {}
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            out[entry["id"]] = _mode_of(entry)
    return out


# -- learning from rejections ---------------------------------------------------------------------

# Messages that say "this model is on the other API", seen from OpenAI, Azure, GitHub Copilot, vLLM,
# LiteLLM and Ollama. Each pattern names the API the model needs.
_NEEDS = (
    (re.compile(r"only supported in v1/responses|use (the )?/?v1/responses|responses api (only|instead)|"
                r"not accessible via the /?(v1/)?chat/completions|not supported (with|on|in|by) (the )?"
                r"/?(v1/)?chat[/ .]?completions|chatcompletion operation does not work|"
                r"does not support (the )?chat[/ .]?completions", re.I), RESPONSES),
    (re.compile(r"only supported in v1/chat/completions|use (the )?/?v1/chat/completions|"
                r"not accessible via the /?(v1/)?responses|not supported (with|on|in|by) (the )?"
                r"(/?v1/)?responses( api| endpoint)?\b|responses operation does not work|"
                r"does not support (the )?responses api", re.I), CHAT),
)
_MODEL_MISSING = re.compile(r"model\b.*\b(not found|does not exist|unknown|not available)|no such model", re.I)


def rejection_needs(status: int, body: bytes, tried: str) -> str | None:
    """The API a rejection says the model needs, or None when it is any other kind of error.

    Only 400/404/405/422 count; never 401/403/429 or 5xx. A 404/405 counts when it is about the
    path (a server without that endpoint), not about the model.
    """
    if status not in LEARNABLE_STATUSES:
        return None
    text = body[:4000].decode("utf-8", "replace")
    for pattern, needs in _NEEDS:
        if pattern.search(text) and needs != tried:
            return needs
    if status in (404, 405) and not _MODEL_MISSING.search(text):
        return other(tried)
    return None


def compact_missing(status: int, body: bytes) -> bool:
    """Whether a rejection of `/v1/responses/compact` says the endpoint is not there (a 404 about the
    path, as some OpenAI accounts answer it), not that the model is unknown."""
    return status == 404 and not _MODEL_MISSING.search(body[:4000].decode("utf-8", "replace"))


# -- the learned cache --------------------------------------------------------------------------

@dataclass(slots=True)
class Learned:
    mode: str | None = None  # the API a rejection said the model needs
    ok: set[str] = field(default_factory=set)  # APIs the model has answered on
    lacks: set[str] = field(default_factory=set)  # endpoints the backend answered 404 for this model

    def dumps(self) -> bytes:
        return orjson.dumps(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mode": self.mode, "ok": sorted(self.ok)}
        if self.lacks:
            doc["lacks"] = sorted(self.lacks)
        return doc

    @property
    def lacks_compact(self) -> bool:
        return COMPACT_PATH in self.lacks

    @staticmethod
    def loads(raw: bytes | None) -> Learned:
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            doc = {}
        mode = doc.get("mode") if doc.get("mode") in (CHAT, RESPONSES) else None
        return Learned(mode, {a for a in doc.get("ok") or () if a in (CHAT, RESPONSES)},
                       {p for p in doc.get("lacks") or () if p == COMPACT_PATH})


class Knowledge:
    """Discovered and learned modes, shared by every Gateway built from successive configs."""

    def __init__(self) -> None:
        self.discovered: dict[str, dict[str, str | None]] = {}  # backend -> model -> mode
        self._learned: dict[tuple[str, str], tuple[float, Learned]] = {}
        self.version = 0  # bumped when a fact changes: Envoy's compiled routes follow it (envoy.xds)
        self._seen: dict[tuple[str, str], bytes] = {}  # each fact as last remembered (callers mutate theirs)

    def discover(self, backend: str, models: dict[str, str | None]) -> None:
        if self.discovered.get(backend) != models:
            self.discovered[backend] = models
            self.version += 1

    def discovered_mode(self, backend: str, model: str) -> str | None:
        return self.discovered.get(backend, {}).get(model)

    def learned(self, backend: str, model: str, now: float) -> Learned | None:
        """The local copy, or None when it is missing or too old (then ask the store)."""
        hit = self._learned.get((backend, model))
        if hit is None or hit[0] < now:
            return None
        return hit[1]

    def remember(self, backend: str, model: str, learned: Learned, now: float, ttl: float = LOCAL_TTL) -> None:
        if len(self._learned) > 100_000:
            self._learned.clear()  # a bound, not an LRU: entries are cheap to fetch again
            self._seen.clear()
        fact = learned.dumps()
        if self._seen.get((backend, model)) != fact:
            self._seen[(backend, model)] = fact
            self.version += 1
        self._learned[(backend, model)] = (now + ttl, learned)

    def forget_all(self) -> None:
        """Drop this replica's copies, so the store (just cleared) is asked again."""
        self._learned.clear()
        self._seen.clear()
        self.version += 1
