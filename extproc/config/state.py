"""The `state:` section: which store holds pins and conversations, and how it is reached."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from extproc.config.model import STORES, State
from extproc.config.reader import Reader

_INTS = {"timeout_ms": (1, 60_000), "ttl_seconds": (60, 10 * 365 * 86400),
         "max_entries": (100, 100_000_000), "max_record_bytes": (1024, 1 << 30),
         "learn_ttl_seconds": (1, 365 * 86400), "max_memory_bytes": (1 << 20, 1 << 40)}
_PATHS = ("sqlite_path", "redis_url", "redis_ca_file")


def state(r: Reader, node: yaml.Node) -> State | None:
    m = r.mapping(node, "state", {"store", "redis_password_env", *_PATHS, *_INTS})
    before = len(r.problems)
    kw: dict[str, Any] = {}
    if "store" in m:
        kw["store"] = r.choice(m["store"], "state.store", STORES)
    for name in _PATHS:
        if name in m:
            kw[name] = r.scalar(m[name], f"state.{name}", str)
    if "redis_password_env" in m:
        kw["redis_password_env"], kw["redis_password"] = r.secret_env(m["redis_password_env"],
                                                                       "state.redis_password_env")
    for name, (lo, hi) in _INTS.items():
        if name in m:
            kw[name] = r.bounded(m[name], f"state.{name}", lo, hi)
    store = kw.get("store", "memory")
    if store == "sqlite" and not kw.get("sqlite_path"):
        r.problem(node, "state.sqlite_path", "required when state.store is sqlite")
    if store == "redis":
        _redis(r, node, m, kw.get("redis_url"), kw.get("redis_ca_file"))
    if len(r.problems) > before:
        return None
    return State(**kw)


def _redis(r: Reader, node: yaml.Node, m: dict[str, yaml.Node], url: str | None, ca: str | None) -> None:
    """A redis URL that carries no secret and no way to turn TLS checks off, and a CA file only for TLS."""
    if not url:
        r.problem(node, "state.redis_url", "required when state.store is redis")
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        r.problem(m["redis_url"], "state.redis_url", "must start with redis://, rediss:// or unix://")
    elif urlsplit(url).password is not None:
        r.problem(m["redis_url"], "state.redis_url", "holds a password: name the environment variable "
                                                     "that holds it in state.redis_password_env instead")
    elif any(k.startswith("ssl_") for k in parse_qs(urlsplit(url).query)):
        r.problem(m["redis_url"], "state.redis_url", "TLS options in the URL (they could turn certificate "
                                                     "checks off): rediss:// verifies, redis_ca_file adds a CA")
    if ca is not None and not (url or "").startswith("rediss://"):
        r.problem(m["redis_ca_file"], "state.redis_ca_file", "only used with a rediss:// (TLS) redis_url")
    elif ca is not None and not os.path.isfile(ca):
        r.problem(m["redis_ca_file"], "state.redis_ca_file", f"no such file: {ca}")
