"""Who may use the gateway: the `clients:` section, its keys as hashes, and what Envoy is given of it.

When the section is present, Envoy itself refuses every request without a listed key (a Lua filter in
deploy/envoy.yaml hashes the caller's key and looks it up), on the fast path too, before anything is
routed. The sidecar hands Envoy the script with the hashes over ADS (`lua_source`, put on the virtual
host by routing.compile), so a config reload changes the accepted keys and no key is ever held in
clear: a `key_env` variable is hashed at load and dropped. A listed key's tenant names the caller's stored
state (`tenancy.header` becomes the header Envoy sets) and its limits (quota.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, TypeVar

import yaml

from extproc.envoy.names import TENANT_HEADER

BUDGET_PERIODS = ("day", "month")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MODEL_GLOB_RE = re.compile(r"^[^\[\]]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T", str, int, bool)  # what a config scalar may be (as the config reader has it)
_SCRIPT = (resources.files("extproc") / "clients.lua").read_text()


class Reader(Protocol):
    """What the config validator offers a section (config.py's validator has these methods)."""

    env: Mapping[str, str]

    def problem(self, node: yaml.Node | None, key: str, msg: str) -> None: ...
    def warning(self, node: yaml.Node | None, key: str, msg: str) -> None: ...
    def mapping(self, node: yaml.Node | None, key: str, allowed: set[str]) -> dict[str, yaml.Node]: ...
    def scalar(self, node: yaml.Node, key: str, kind: type[T]) -> T | None: ...
    def bounded(self, node: yaml.Node, key: str, lo: int, hi: int) -> int | None: ...
    def string_list(self, node: yaml.Node, key: str) -> list[str]: ...
    def choice(self, node: yaml.Node, key: str, choices: tuple[str, ...]) -> str | None: ...


@dataclass(frozen=True)
class Budget:
    tokens: int
    per: str  # day | month (UTC calendar periods)


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits, given on one of its keys; every key of the tenant shares them (and their counters)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: Budget | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.token_budget))

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.token_budget is not None


@dataclass(frozen=True)
class Client:
    key_sha256: str  # hex SHA-256 of the key: all the gateway ever holds
    tenant: str
    models: tuple[str, ...] | None = None  # exact names or `*`/`?` globs; None: every model
    limits: TenantLimits = TenantLimits()


@dataclass(frozen=True)
class Clients:
    entries: tuple[Client, ...]

    def limits(self, tenant: str) -> TenantLimits | None:
        """A listed tenant's limits (None for a name the config does not list)."""
        return next((c.limits for c in self.entries if c.tenant == tenant), None)

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.tenant for c in self.entries))


def key_hash(key: str) -> str:
    """What `key_sha256` holds for a key: `printf %s "$KEY" | sha256sum`."""
    return hashlib.sha256(key.encode()).hexdigest()


def lua_pattern(glob: str) -> str:
    """A `*`/`?` glob as an anchored Lua pattern (string.find in Envoy's Lua filter)."""
    out = []
    for c in glob:
        out.append(".*" if c == "*" else "." if c == "?" else "%" + c if not c.isalnum() else c)
    return "^" + "".join(out) + "$"


def _lua_string(text: str) -> str:
    """A Lua string literal holding `text` whatever it contains: every other byte as a decimal escape."""
    return '"' + "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\{b:03d}"
                         for b in text.encode()) + '"'


def lua_source(clients: Clients, stage: str) -> str:
    """The script for one of Envoy's two Lua stages (`key`, `models`): clients.lua after its table of key
    hashes, each with its tenant, whether Envoy asks the rate-limit service about it (only tenants with
    limits: the others cost no call) and, for the models stage, its models as patterns."""
    rows = []
    for c in clients.entries:
        if stage == "models" and c.models is None:
            continue
        fields = [f"tenant = {_lua_string(c.tenant)}", f"limited = {str(c.limits.any).lower()}"]
        if c.models is not None:
            fields.append("models = {" + ", ".join(_lua_string(lua_pattern(m)) for m in c.models) + "}")
        rows.append(f"  [{_lua_string(c.key_sha256)}] = {{{', '.join(fields)}}},\n")
    return f"local STAGE, KEYS = {_lua_string(stage)}, {{\n{''.join(rows)}}}\n" + _SCRIPT


def parse_clients(r: Reader, node: yaml.Node) -> Clients | None:
    """The `clients:` section: a list of keys, each with its tenant, models and the tenant's limits."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        r.problem(node, "clients", "must be a non-empty list of {key_env | key_sha256, tenant, ...}")
        return None
    entries: list[Client] = []
    given: dict[str, TenantLimits] = {}  # a tenant's limits, from whichever of its keys gives them
    for i, item in enumerate(node.value):
        if (client := _client(r, item, f"clients[{i}]")) is None:
            continue
        if any(c.key_sha256 == client.key_sha256 for c in entries):
            r.problem(item, f"clients[{i}]", "the same key is listed twice")
        elif client.limits.any and given.setdefault(client.tenant, client.limits) != client.limits:
            r.problem(item, f"clients[{i}]", f"tenant {client.tenant!r} has limits on an earlier key: a tenant's "
                                             "keys share one set of limits, give them on one of its keys")
        else:
            entries.append(client)
    if len(entries) != len(node.value):
        return None
    return Clients(tuple(dataclasses.replace(c, limits=given.get(c.tenant, TenantLimits())) for c in entries))


def _client(r: Reader, node: yaml.Node, key: str) -> Client | None:
    m = r.mapping(node, key, {"key_env", "key_sha256", "tenant", "models", "requests_per_minute",
                              "tokens_per_minute", "token_budget"})
    if not m and not isinstance(node, yaml.MappingNode):
        return None
    digest = _key(r, node, m, key)
    tenant = r.scalar(m["tenant"], f"{key}.tenant", str) if "tenant" in m else None
    if "tenant" not in m:
        r.problem(node, f"{key}.tenant", "required: the name this key's stored state and limits go by")
    elif tenant is not None and not _TENANT_RE.match(tenant):
        r.problem(m["tenant"], f"{key}.tenant", "use letters, digits, '.', '_' or '-' (at most 63)")
        tenant = None
    models = None
    if "models" in m:
        models = tuple(r.string_list(m["models"], f"{key}.models"))
        if not models:
            r.problem(m["models"], f"{key}.models", "must list at least one model name or glob (leave it out: any)")
            models = None
        for j, name in enumerate(models or ()):
            if not _MODEL_GLOB_RE.match(name):
                r.problem(m["models"], f"{key}.models[{j}]", "a model name or a glob with '*' and '?' (no '[...]')")
                models = None
                break
    limits: dict[str, Any] = {}
    for name in ("requests_per_minute", "tokens_per_minute"):
        if name in m:
            limits[name] = r.bounded(m[name], f"{key}.{name}", 1, 1 << 40)
    if "token_budget" in m:
        limits["token_budget"] = _budget(r, m["token_budget"], f"{key}.token_budget")
    if digest is None or tenant is None or (models is None and "models" in m) or None in limits.values():
        return None
    return Client(key_sha256=digest, tenant=tenant, models=models, limits=TenantLimits(**limits))


def _key(r: Reader, node: yaml.Node, m: dict[str, yaml.Node], key: str) -> str | None:
    """The key's hash: from `key_sha256`, or the `key_env` variable's value hashed (and dropped)."""
    if ("key_env" in m) == ("key_sha256" in m):
        r.problem(node, key, "give exactly one of 'key_env' (a variable holding the key) or 'key_sha256' (its hash)")
        return None
    if "key_sha256" in m:
        digest = r.scalar(m["key_sha256"], f"{key}.key_sha256", str)
        if digest is not None and not _HASH_RE.match(digest):
            r.problem(m["key_sha256"], f"{key}.key_sha256", "must be 64 lower-case hex digits (sha256sum's output)")
            return None
        return digest
    var = r.scalar(m["key_env"], f"{key}.key_env", str)
    if var is None or not _ENV_RE.match(var):
        if var is not None:
            r.problem(m["key_env"], f"{key}.key_env", "must be an environment variable name")
        return None
    value = r.env.get(var)
    if not value:
        r.problem(m["key_env"], f"{key}.key_env", f"environment variable {var} is not set or empty")
        return None
    return key_hash(value)


def _budget(r: Reader, node: yaml.Node, key: str) -> Budget | None:
    m = r.mapping(node, key, {"tokens", "per"})
    for req in ("tokens", "per"):
        if req not in m:
            r.problem(node, f"{key}.{req}", "required")
    tokens = r.bounded(m["tokens"], f"{key}.tokens", 1, 1 << 50) if "tokens" in m else None
    per = r.choice(m["per"], f"{key}.per", BUDGET_PERIODS) if "per" in m else None
    return Budget(tokens, per) if tokens is not None and per is not None else None


def settle(r: Reader, node: yaml.Node, kw: dict[str, Any]) -> None:
    """What the section changes elsewhere in the config (`node`: the backends' list; `kw`: the Config's
    arguments, `tenancy` included): with it, the tenant is the header Envoy sets after the key check; without it, a warning
    for every backend key any caller could spend."""
    if kw.get("clients") is None:
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        for i, item in enumerate(items):
            found = [v for k, v in (item.value if isinstance(item, yaml.MappingNode) else []) if k.value == "api_key_env"]
            if found:
                r.warning(found[0], f"backends[{i}].api_key_env", "no 'clients' section: any caller that reaches the "
                                                                 "gateway spends this key (list the keys that may)")
        return
    tenancy = kw["tenancy"]
    if tenancy.header not in (None, TENANT_HEADER):
        r.problem(node, "tenancy.header", "the 'clients' section names the tenant (Envoy sets "
                                          f"{TENANT_HEADER}): leave tenancy.header out")
    else:
        kw["tenancy"] = dataclasses.replace(tenancy, header=TENANT_HEADER)
