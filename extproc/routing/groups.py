"""Model groups: a model that several backends serve, and the order one request's attempts take (sans-IO).

A model name listed **exactly** (no `*`, `?` or `[`) in the `models` of two or more backends forms a
group; its members are those backends in config order, and the first is the primary, the one that the
classifier routes the model to anyway. Patterns never form or join a group: a catch-all `*` backend
stays what it is today, the backend of every name nothing else lists, and never silently becomes every
model's fallback. To make a backend a fallback for a model, list the model's name in its `models`.

The attempt order (`attempt_order`): when members carry a `weight`, the first attempt is spread across
the weighted members by weight, by a hash of the request's key (weighted rendezvous hashing: the same
key goes to the same member while it is in, and a member taken out moves only its own share); the
rest follow in config order. Members taken out for now (ejected, or held off by a `retry-after`) go
after those that are in, and unconfigured members (a missing key, no instances: they can only answer
503) after those, so each is tried only when nothing better is left. At most `failover.max_attempts`
backends. Envoy walks one request along the order's first member and then config order
(`group_routes.first_on`); the attempts themselves, the deadline included, are `exchange.failover`'s.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from extproc.config import Backend, Config
from extproc.routing.classify import is_glob
from extproc.routing.failover import Health


@dataclass(frozen=True)
class Member:
    backend: Backend
    weight: int | None  # the backend's `weight`: None takes no share of first attempts


@dataclass(frozen=True)
class Group:
    model: str
    members: tuple[Member, ...]  # config order; the first is the primary

    @property
    def primary(self) -> Backend:
        return self.members[0].backend

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(m.backend for m in self.members)


def groups(config: Config) -> Mapping[str, Group]:
    """Every group of the config, by model name, in the order the names first appear (computed once
    per config)."""
    return config.derived(_groups)


def _groups(config: Config) -> Mapping[str, Group]:
    listed: dict[str, list[Backend]] = {}
    for b in config.backends:
        for name in dict.fromkeys(b.models):
            if not is_glob(name):
                listed.setdefault(name, []).append(b)
    return MappingProxyType({name: Group(name, tuple(Member(b, b.weight) for b in members))
                             for name, members in listed.items() if len(members) > 1})


def group_for(config: Config, model: str) -> Group | None:
    """The group serving `model`, or None when one backend (or none) serves it."""
    return groups(config).get(model)


def attempt_order(group: Group, key: str, health: Health, now: float,
                  max_attempts: int | None = None) -> tuple[Backend, ...]:
    """The backends one request tries, in order (see the module's docstring). `key` places the first
    attempt among weighted members (the request's session or placement key: stable for a conversation);
    `max_attempts` defaults to `health.settings.max_attempts`."""
    limit = health.settings.max_attempts if max_attempts is None else max_attempts
    ready, later = _standing(group, health, now)
    weighted = [m for m in ready if m.weight is not None]
    if weighted:
        key_hash = _hash(key)
        first = max(weighted, key=lambda m: _score(key_hash, m))
        ready = [first, *(m for m in ready if m is not first)]
    return tuple(m.backend for m in (*ready, *later)[:limit])


def first_shares(group: Group, health: Health, now: float) -> tuple[tuple[Backend, float], ...]:
    """Each member `attempt_order` can put first while health stays as it is at `now`, with the share of
    placement keys it takes: the weighted members that are in, by their weights' shares (what the
    rendezvous hash spreads), else the one member that comes first. For `extproc resolve`."""
    ready, later = _standing(group, health, now)
    weighted = [m for m in ready if m.weight is not None]
    if not weighted:
        return (((ready or later)[0].backend, 1.0),)
    total = sum(m.weight or 0 for m in weighted)
    return tuple((m.backend, (m.weight or 0) / total) for m in weighted)


def _standing(group: Group, health: Health, now: float) -> tuple[list[Member], list[Member]]:
    """The members that are in, in config order, and the rest, in the order they are tried: taken out
    (ejected or held off), then unconfigured (they can only answer 503)."""
    ready: list[Member] = []
    taken_out: list[Member] = []
    unconfigured: list[Member] = []
    for m in group.members:
        (unconfigured if m.backend.unserved() is not None else
         ready if health.available(m.backend.name, now) else taken_out).append(m)
    return ready, [*taken_out, *unconfigured]


def continue_order(group: Group, key: str, health: Health, now: float, *, previous_backend: str | None,
                   max_attempts: int | None = None) -> tuple[Backend, ...]:
    """The attempt order of a turn that continues a conversation the sidecar holds (`previous_response_id`
    on a chat backend: docs/state.md), whose previous turn `previous_backend` served. Every member can
    rebuild it, so the whole group is tried, the previous turn's backend first while it is in (its prefix
    cache). With no `previous_backend` (a first turn, or a turn recorded before turns named their
    backend), the order is `attempt_order`'s. (A response a backend stored itself is not failed over:
    `exchange.failover.hand_over` sends its turn where its pin says.)"""
    order = attempt_order(group, key, health, now, max_attempts)
    previous = next((b for b in group.backends if b.name == previous_backend), None)
    if previous is None or not health.available(previous.name, now) or previous.unserved() is not None:
        return order
    limit = len(order)
    return (previous, *(b for b in order if b is not previous))[:limit]


def _score(key_hash: int, member: Member) -> float:
    """Weighted rendezvous hashing: the member with the highest score takes the key; each member's
    chance is its weight's share (-w / ln u, u uniform in (0, 1) from the key's hash and the member's)."""
    u = (_mix(key_hash ^ _seed(member.backend.name)) + 0.5) / 2.0**64
    return -(member.weight or 0) / math.log(u)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=1024)
def _seed(name: str) -> int:
    return _hash(name)


def _mix(h: int) -> int:
    """splitmix64's finaliser: one key's hash and each member's seed give independent uniform values."""
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


_MASK = (1 << 64) - 1


def describe(group: Group) -> str:
    """The group's order in words, for `check-config` and `resolve`."""
    names = ", ".join(m.backend.name for m in group.members)
    weighted = [m for m in group.members if m.weight is not None]
    if not weighted:
        return f"{names} (config order; {group.primary.name} is the primary)"
    total = sum(m.weight or 0 for m in weighted)
    shares = ", ".join(f"{m.backend.name} {100 * (m.weight or 0) / total:.0f}%" for m in weighted)
    return f"{names}: first attempts by weight ({shares}), then the others in config order"
