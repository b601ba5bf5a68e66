"""The sidecar's YAML configuration: loading, validation with line numbers, typed result.

Validation collects every problem instead of stopping at the first, so `extproc check-config`
can print them all at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from extproc.api import API_MODES, BACKEND_APIS
from extproc.clients import Clients, parse_clients, settle

MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class ConfigError(Exception):
    """Every problem found in a config file, each with its location."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Endpoint:
    address: str  # "ip:port", the value Envoy's ORIGINAL_DST cluster dials
    weight: int = 1
    source: str | None = field(default=None, compare=False)  # the `dns:` name it was resolved from


@dataclass(frozen=True)
class Unserved:
    """A backend that cannot take requests: they get a 503 with this code and message."""

    code: str  # backend_unconfigured | no_endpoints
    message: str


@dataclass(frozen=True)
class Backend:
    name: str
    api: str  # chat | responses | both
    models: tuple[str, ...]
    endpoints: tuple[Endpoint, ...] = ()
    cluster: str | None = None
    path_prefix: str = ""
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # resolved from api_key_env, never logged
    translate: bool = True
    chat_max_tokens_field: str = "max_completion_tokens"
    vnodes: int = 160
    hosted_tools: str = "drop"  # Responses hosted tools (web_search, ...) for a chat backend: drop | reject
    replay_reasoning: bool = False  # send earlier turns' reasoning back as reasoning_content
    dns_names: tuple[str, ...] = ()  # `dns:` entries: re-resolved periodically, the ring follows them
    dns_weights: tuple[int, ...] = ()  # the weight of each `dns:` entry

    def unserved(self) -> Unserved | None:
        """Why requests for this backend cannot be sent now (None: they can). The sidecar still starts,
        so one backend's missing secret or not-yet-resolvable name does not take the others down."""
        if self.api_key_env and not self.api_key:
            return Unserved("backend_unconfigured", f"Backend '{self.name}' is not configured: the environment "
                                                    f"variable {self.api_key_env} (its api_key_env) is not set "
                                                    "in the gateway sidecar")
        if self.cluster is None and not self.endpoints:
            return Unserved("no_endpoints", f"Backend '{self.name}' has no instances: "
                                            f"{', '.join(self.dns_names)} resolves to no address yet")
        return None

    def resolve_dns(self) -> tuple[Endpoint, ...] | None:
        """The endpoints with the `dns:` entries resolved again (None when a name does not resolve now:
        keep the last known ones)."""
        dns = set(self.dns_names)
        fixed = [e for e in self.endpoints if e.source not in dns]
        for name, weight in zip(self.dns_names, self.dns_weights, strict=True):
            resolved = _Validator.resolve(name, every_address=True)
            if not resolved:
                return None
            fixed += [Endpoint(a, weight, name) for a in resolved]
        return tuple(fixed)


@dataclass(frozen=True)
class ModelRule:
    match: str
    mode: str | None = None
    translate: bool | None = None


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 48 * 1024 * 1024  # below Envoy's 64 MiB buffer: the sidecar answers first
    upstream_timeout_seconds: int = 600  # how long a backend may stay silent (the compiled routes' idle timeout)


STORES = ("memory", "sqlite", "redis")


@dataclass(frozen=True)
class State:
    """Where response pins and sidecar-held conversations live, and for how long."""

    store: str = "memory"  # memory (one replica) | sqlite (survives restarts) | redis (shared by replicas)
    sqlite_path: str | None = None
    redis_url: str | None = None  # never with a password in it: that comes from redis_password_env
    redis_password_env: str | None = None
    redis_password: str | None = field(default=None, repr=False)  # resolved from redis_password_env
    redis_ca_file: str | None = None  # rediss://: a private CA trusted besides the system store
    timeout_ms: int = 250  # per store call; a slower store counts as unavailable
    ttl_seconds: int = 30 * 24 * 3600  # as long as OpenAI keeps stored responses
    max_entries: int = 100_000  # memory store bounds (least recently used go first)
    max_memory_bytes: int = 32 * 1024 * 1024
    max_record_bytes: int = 8 * 1024 * 1024  # larger conversations turns are not stored (logged)
    learn_ttl_seconds: int = 24 * 3600  # how long a learned model API is trusted before it is re-learned


@dataclass(frozen=True)
class Discovery:
    """Reading backends' /v1/models (backends declared auto or both)."""

    interval_seconds: int = 300
    timeout_ms: int = 2000
    allow_mode_header: bool = False  # honour a client's x-gateway-model-mode header

@dataclass(frozen=True)
class Tenancy:
    """Whose stored conversations a request may see (docs/security.md)."""

    header: str | None = None  # take the tenant from this header (set by Envoy's ext_authz/jwt_authn)
    secret_env: str = "EXTPROC_TENANT_SECRET"  # HMAC key; unset: one random secret kept in the state store


@dataclass(frozen=True)
class ListenTLS:
    """TLS on the ext_proc listener (Envoy dials it over the network rather than localhost)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: Envoy must present a certificate signed by it (mTLS)


@dataclass(frozen=True)
class Config:
    backends: tuple[Backend, ...]
    model_rules: tuple[ModelRule, ...] = ()
    listen: str = "127.0.0.1:50051"
    log_level: str = "info"
    limits: Limits = Limits()
    state: State = State()
    discovery: Discovery = Discovery()
    listen_tls: ListenTLS | None = None
    tenancy: Tenancy = Tenancy()
    admin_listen: str | None = "127.0.0.1:9902"  # /healthz /readyz /metrics; None turns it off
    websocket_listen: str | None = "127.0.0.1:50052"  # WebSocket mode's front door (Envoy routes upgrades here)
    websocket_gateway: str = "http://127.0.0.1:10000"  # Envoy's listener, where socket messages are sent as requests
    usage_accounting: str = "all"  # all: read usage from passed-through answers too; translated: only those
    log_format: str = "json"  # json (one object per line) | text
    fast_path: bool = True  # compile pass-through decisions into Envoy routes (served over xDS), see routing.compile
    clients: Clients | None = None  # the keys that may use the gateway (extproc/clients.py); None: any caller
    source: str = "<memory>"
    warnings: tuple[str, ...] = ()  # problems that do not stop the load: a backend that cannot serve yet

    def unserved(self) -> list[str]:
        """One line per backend that cannot take requests now, for /readyz and the log."""
        return [u.message for b in self.backends if (u := b.unserved()) is not None]

    def backend(self, name: str) -> Backend | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None


def load_config(path: str, env: dict[str, str] | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    return parse_config(text, source=path, env=env)


def parse_config(text: str, source: str = "<memory>", env: dict[str, str] | None = None) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return _Validator(source, os.environ if env is None else env).config(node)


class _Validator:
    """Turns a composed YAML node tree into a Config, recording problems with file:line:key."""

    def __init__(self, source: str, env: Any):
        self.source = source
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def where(self, node: yaml.Node | None, key: str, msg: str) -> str:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return f"{self.source}{line}: {key}: {msg}"

    def problem(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.problems.append(self.where(node, key, msg))

    def warning(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.warnings.append(self.where(node, key, msg))

    def mapping(self, node: yaml.Node | None, key: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, "must be a mapping")
            return {}
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            if name not in allowed:
                self.problem(k, f"{key}.{name}" if key else str(name),
                             f"unknown key (allowed: {', '.join(sorted(allowed))})")
            elif name in out:
                self.problem(k, f"{key}.{name}" if key else name, "duplicate key")
            else:
                out[name] = v
        return out

    def scalar(self, node: yaml.Node, key: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, key, f"must be a {kind.__name__}")
            return None
        value = yaml.safe_load(yaml.serialize(node))
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            self.problem(node, key, f"must be a {kind.__name__}, got {value!r}")
            return None
        return value

    def bounded(self, node: yaml.Node, key: str, lo: int, hi: int) -> int | None:
        v = self.scalar(node, key, int)
        if v is not None and not lo <= v <= hi:
            self.problem(node, key, f"must be between {lo} and {hi}")
        return v

    def string_list(self, node: yaml.Node, key: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, key, "must be a list of strings")
            return []
        out = []
        for i, item in enumerate(node.value):
            v = self.scalar(item, f"{key}[{i}]", str)
            if v is not None:
                out.append(v)
        return out

    def secret_env(self, node: yaml.Node, key: str) -> tuple[str | None, str | None]:
        """An environment variable named in the config and its value, which must be set: a secret that
        is missing fails the load rather than connecting without it."""
        var = self.scalar(node, key, str)
        if var is None or not _ENV_RE.match(var):
            if var is not None:
                self.problem(node, key, "must be an environment variable name")
            return None, None
        if not self.env.get(var):
            self.problem(node, key, f"environment variable {var} is not set or empty")
        return var, self.env.get(var)

    def choice(self, node: yaml.Node, key: str, choices: tuple[str, ...]) -> str | None:
        v = self.scalar(node, key, str)
        if v is not None and v not in choices:
            self.problem(node, key, f"must be one of {', '.join(choices)}, got {v!r}")
            return None
        return v

    def config(self, root: yaml.Node | None) -> Config:
        if root is None:
            raise ConfigError([f"{self.source}: empty config: at least one backend is required"])
        top = self.mapping(root, "", {"listen", "log_level", "backends", "model_rules", "limits", "state",
                                      "discovery", "admin_listen", "usage_accounting", "log_format", "listen_tls",
                                      "tenancy", "websocket_listen", "websocket_gateway",
                                      "fast_path", "clients"})
        kw: dict[str, Any] = {"source": self.source, **self.top_scalars(top)}
        sections = {"listen_tls": self.listen_tls, "limits": self.limits, "discovery": self.discovery,
                    "state": self.state, "tenancy": self.tenancy, "clients": lambda n: parse_clients(self, n)}
        for name, parse in sections.items():
            if name in top and (value := parse(top[name])) is not None:
                kw[name] = value
        backends = self.backends(root, top)
        rules = self.rules(top["model_rules"]) if "model_rules" in top else []
        kw.setdefault("tenancy", Tenancy())
        settle(self, top.get("backends", root), kw)
        if self.problems:
            raise ConfigError(self.problems)
        return Config(backends=tuple(backends), model_rules=tuple(rules), warnings=tuple(self.warnings), **kw)

    def top_scalars(self, top: dict[str, yaml.Node]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if "listen" in top:
            listen = self.scalar(top["listen"], "listen", str)
            if listen is not None:
                kw["listen"] = listen
        for key in ("admin_listen", "websocket_listen"):
            if key in top:
                kw[key] = None if top[key].value in ("off", "", "null", "~") else self.scalar(top[key], key, str)
        if "websocket_gateway" in top:
            url = self.scalar(top["websocket_gateway"], "websocket_gateway", str)
            if url is not None and not re.match(r"^https?://[^/?#]+$", url):
                self.problem(top["websocket_gateway"], "websocket_gateway", "must be http(s)://host:port, no path")
            elif url is not None:
                kw["websocket_gateway"] = url
        if "usage_accounting" in top:
            kw["usage_accounting"] = self.choice(top["usage_accounting"], "usage_accounting", ("all", "translated"))
        if "fast_path" in top:
            kw["fast_path"] = self.scalar(top["fast_path"], "fast_path", bool)
        if "log_format" in top:
            kw["log_format"] = self.choice(top["log_format"], "log_format", ("json", "text"))
        if "log_level" in top:
            lvl = self.choice(top["log_level"], "log_level", ("debug", "info", "warning", "error"))
            if lvl:
                kw["log_level"] = lvl
        return kw

    def listen_tls(self, node: yaml.Node) -> ListenTLS | None:
        t = self.mapping(node, "listen_tls", {"cert_file", "key_file", "client_ca_file"})
        files = {}
        for name in ("cert_file", "key_file", "client_ca_file"):
            if name in t:
                path = self.scalar(t[name], f"listen_tls.{name}", str)
                if path is not None and not os.path.isfile(path):
                    self.problem(t[name], f"listen_tls.{name}", f"no such file: {path}")
                files[name] = path
            elif name != "client_ca_file":
                self.problem(node, f"listen_tls.{name}", "required")
        return ListenTLS(**files) if files.get("cert_file") and files.get("key_file") else None

    def limits(self, node: yaml.Node) -> Limits | None:
        lim = self.mapping(node, "limits", {"max_body_bytes", "upstream_timeout_seconds"})
        before = len(self.problems)
        kw: dict[str, Any] = {}
        if "max_body_bytes" in lim:
            n = self.scalar(lim["max_body_bytes"], "limits.max_body_bytes", int)
            if n is not None and n < 1024:
                self.problem(lim["max_body_bytes"], "limits.max_body_bytes", "must be at least 1024")
            kw["max_body_bytes"] = n
        if "upstream_timeout_seconds" in lim:
            kw["upstream_timeout_seconds"] = self.bounded(lim["upstream_timeout_seconds"],
                                                          "limits.upstream_timeout_seconds", 1, 86400)
        return Limits(**kw) if kw and len(self.problems) == before else None

    def discovery(self, node: yaml.Node) -> Discovery:
        d = self.mapping(node, "discovery", {"interval_seconds", "timeout_ms", "allow_mode_header"})
        dkw: dict[str, Any] = {}
        for name, (lo, hi) in {"interval_seconds": (5, 86400), "timeout_ms": (100, 60_000)}.items():
            if name in d:
                dkw[name] = self.bounded(d[name], f"discovery.{name}", lo, hi)
        if "allow_mode_header" in d:
            dkw["allow_mode_header"] = self.scalar(d["allow_mode_header"], "discovery.allow_mode_header", bool)
        return Discovery(**dkw)

    def tenancy(self, node: yaml.Node) -> Tenancy | None:
        m = self.mapping(node, "tenancy", {"header", "secret_env"})
        kw: dict[str, Any] = {}
        if "header" in m:
            header = self.scalar(m["header"], "tenancy.header", str)
            if header is not None and not _HEADER_RE.match(header):
                self.problem(m["header"], "tenancy.header", "must be a lower-case HTTP header name")
            kw["header"] = header
        if "secret_env" in m:
            env = self.scalar(m["secret_env"], "tenancy.secret_env", str)
            if env is not None and not _ENV_RE.match(env):
                self.problem(m["secret_env"], "tenancy.secret_env", "must be an environment variable name")
            kw["secret_env"] = env
        return Tenancy(**kw)

    def backends(self, root: yaml.Node, top: dict[str, yaml.Node]) -> list[Backend]:
        backends: list[Backend] = []
        if "backends" not in top:
            self.problem(root, "backends", "required: list at least one backend")
        elif not isinstance(top["backends"], yaml.SequenceNode) or not top["backends"].value:
            self.problem(top["backends"], "backends", "must be a non-empty list")
        else:
            seen: set[str] = set()
            for i, bnode in enumerate(top["backends"].value):
                b = self.backend(bnode, f"backends[{i}]")
                if b is None:
                    continue
                if b.name in seen:
                    self.problem(bnode, f"backends[{i}].name", f"duplicate backend name {b.name!r}")
                seen.add(b.name)
                backends.append(b)
        return backends

    def rules(self, node: yaml.Node) -> list[ModelRule]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "model_rules", "must be a list")
            return []
        return [r for i, rnode in enumerate(node.value) if (r := self.rule(rnode, f"model_rules[{i}]")) is not None]

    def state(self, node: yaml.Node) -> State | None:
        ints = {"timeout_ms": (1, 60_000), "ttl_seconds": (60, 10 * 365 * 86400),
                "max_entries": (100, 100_000_000), "max_record_bytes": (1024, 1 << 30),
                "learn_ttl_seconds": (1, 365 * 86400), "max_memory_bytes": (1 << 20, 1 << 40)}
        paths = ("sqlite_path", "redis_url", "redis_ca_file")
        m = self.mapping(node, "state", {"store", "redis_password_env", *paths, *ints})
        before = len(self.problems)
        kw: dict[str, Any] = {}
        if "store" in m:
            kw["store"] = self.choice(m["store"], "state.store", STORES)
        for name in paths:
            if name in m:
                kw[name] = self.scalar(m[name], f"state.{name}", str)
        if "redis_password_env" in m:
            kw["redis_password_env"], kw["redis_password"] = self.secret_env(m["redis_password_env"],
                                                                             "state.redis_password_env")
        for name, (lo, hi) in ints.items():
            if name in m:
                kw[name] = self.bounded(m[name], f"state.{name}", lo, hi)
        store = kw.get("store", "memory")
        if store == "sqlite" and not kw.get("sqlite_path"):
            self.problem(node, "state.sqlite_path", "required when state.store is sqlite")
        if store == "redis":
            url = kw.get("redis_url")
            if not url:
                self.problem(node, "state.redis_url", "required when state.store is redis")
            elif not url.startswith(("redis://", "rediss://", "unix://")):
                self.problem(m["redis_url"], "state.redis_url", "must start with redis://, rediss:// or unix://")
            elif urlsplit(url).password is not None:
                self.problem(m["redis_url"], "state.redis_url", "holds a password: name the environment variable "
                                                                "that holds it in state.redis_password_env instead")
            elif any(k.startswith("ssl_") for k in parse_qs(urlsplit(url).query)):
                self.problem(m["redis_url"], "state.redis_url", "TLS options in the URL (they could turn certificate "
                                                                "checks off): rediss:// verifies, redis_ca_file adds a CA")
            ca = kw.get("redis_ca_file")
            if ca is not None and not (url or "").startswith("rediss://"):
                self.problem(m["redis_ca_file"], "state.redis_ca_file", "only used with a rediss:// (TLS) redis_url")
            elif ca is not None and not os.path.isfile(ca):
                self.problem(m["redis_ca_file"], "state.redis_ca_file", f"no such file: {ca}")
        if len(self.problems) > before:
            return None
        return State(**kw)

    def backend(self, node: yaml.Node, key: str) -> Backend | None:
        allowed = {"name", "api", "models", "endpoints", "cluster", "path_prefix", "api_key_env",
                   "translate", "chat_max_tokens_field", "vnodes", "hosted_tools", "replay_reasoning"}
        m = self.mapping(node, key, allowed)
        before = len(self.problems)
        for req in ("name", "api", "models"):
            if req not in m:
                self.problem(node, f"{key}.{req}", "required")
        name = self.scalar(m["name"], f"{key}.name", str) if "name" in m else None
        if name is not None and not _NAME_RE.match(name):
            self.problem(m["name"], f"{key}.name", "use letters, digits, '.', '_' or '-' (at most 63)")
        api = self.choice(m["api"], f"{key}.api", BACKEND_APIS) if "api" in m else None
        models = self.string_list(m["models"], f"{key}.models") if "models" in m else []
        if "models" in m and not models:
            self.problem(m["models"], f"{key}.models", "must list at least one model name or pattern")
        endpoints, dns_names, dns_weights = self.endpoints(m["endpoints"], f"{key}.endpoints") \
            if "endpoints" in m else ((), (), ())
        cluster = self.scalar(m["cluster"], f"{key}.cluster", str) if "cluster" in m else None
        if ("endpoints" in m) == ("cluster" in m):
            self.problem(node, key, "give exactly one of 'endpoints' (instances the sidecar picks) "
                                    "or 'cluster' (an Envoy cluster named in deploy/envoy.yaml)")
        kw: dict[str, Any] = {}
        if "path_prefix" in m:
            p = self.scalar(m["path_prefix"], f"{key}.path_prefix", str)
            if p is not None and p and (not p.startswith("/") or p.endswith("/")):
                self.problem(m["path_prefix"], f"{key}.path_prefix", "must start with '/' and not end with '/'")
            elif p is not None:
                kw["path_prefix"] = p
        if "api_key_env" in m:
            var = self.scalar(m["api_key_env"], f"{key}.api_key_env", str)
            if var is not None and not _ENV_RE.match(var):
                self.problem(m["api_key_env"], f"{key}.api_key_env", "must be an environment variable name")
            elif var is not None:
                value = self.env.get(var)
                if not value:
                    self.warning(m["api_key_env"], f"{key}.api_key_env",
                                 f"environment variable {var} is not set or empty: this backend's requests "
                                 "get 503 backend_unconfigured until the sidecar runs with it set")
                kw["api_key_env"], kw["api_key"] = var, value
        if "translate" in m:
            kw["translate"] = self.scalar(m["translate"], f"{key}.translate", bool)
        if "chat_max_tokens_field" in m:
            kw["chat_max_tokens_field"] = self.choice(
                m["chat_max_tokens_field"], f"{key}.chat_max_tokens_field", MAX_TOKENS_FIELDS)
        if "hosted_tools" in m:
            kw["hosted_tools"] = self.choice(m["hosted_tools"], f"{key}.hosted_tools", ("drop", "reject"))
        if "replay_reasoning" in m:
            kw["replay_reasoning"] = self.scalar(m["replay_reasoning"], f"{key}.replay_reasoning", bool)
        if "vnodes" in m:
            kw["vnodes"] = self.bounded(m["vnodes"], f"{key}.vnodes", 1, 4096)
        if len(self.problems) > before:
            return None
        return Backend(name=name, api=api, models=tuple(models), endpoints=endpoints, cluster=cluster,
                       dns_names=dns_names, dns_weights=dns_weights, **kw)

    def endpoints(self, node: yaml.Node, key: str) -> tuple[tuple[Endpoint, ...], tuple[str, ...], tuple[int, ...]]:
        """The endpoints, and the `dns:` names among them (re-resolved while running)."""
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.problem(node, key, "must be a non-empty list of 'host:port' or {address, weight}")
            return (), (), ()
        out: list[Endpoint] = []
        dns_names: list[str] = []
        dns_weights: list[int] = []
        for i, item in enumerate(node.value):
            k = f"{key}[{i}]"
            weight = 1
            every_address = False
            if isinstance(item, yaml.MappingNode):
                m = self.mapping(item, k, {"address", "dns", "weight"})
                if ("address" in m) == ("dns" in m):
                    self.problem(item, k, "give exactly one of 'address' (one instance) or 'dns' (every address "
                                          "a name resolves to, e.g. a headless Service)")
                    continue
                every_address = "dns" in m
                if "weight" in m:
                    weight = self.scalar(m["weight"], f"{k}.weight", int) or 0
                    if not 1 <= weight <= 100:
                        self.problem(m["weight"], f"{k}.weight", "must be between 1 and 100")
                        continue
                addr_node = m["dns" if every_address else "address"]
            else:
                addr_node = item
            addr = self.scalar(addr_node, k, str)
            if addr is None:
                continue
            if every_address:
                dns_names.append(addr)
                dns_weights.append(weight)
            resolved = self.resolve(addr, every_address)
            if not resolved and every_address and self.host_port(addr) is not None:
                self.warning(addr_node, k, f"{addr!r} does not resolve now: no instances until it does (re-resolved "
                                           "every discovery.interval_seconds); its requests get 503 no_endpoints")
                continue
            if not resolved:
                self.problem(addr_node, k, f"{addr!r} is not 'host:port' with a resolvable host and a port 1-65535")
                continue
            for address in resolved:
                if any(e.address == address for e in out):
                    self.problem(addr_node, k, f"duplicate endpoint {address}")
                    continue
                out.append(Endpoint(address, weight, addr if every_address else None))
        return tuple(out), tuple(dns_names), tuple(dns_weights)

    @staticmethod
    def host_port(addr: str) -> tuple[str, str] | None:
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            return None
        return host.strip("[]"), port

    @staticmethod
    def resolve(addr: str, every_address: bool = False) -> list[str]:
        """ORIGINAL_DST needs IP literals: host names are resolved at load (and at each reload)."""
        split = _Validator.host_port(addr)
        if split is None:
            return []
        host, port = split
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError:
                return []
            ips = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
            ips = sorted(ips, key=str) if every_address else ips[:1]
        return [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in ips]

    def rule(self, node: yaml.Node, key: str) -> ModelRule | None:
        m = self.mapping(node, key, {"match", "mode", "translate"})
        before = len(self.problems)
        if "match" not in m:
            self.problem(node, f"{key}.match", "required")
        match = self.scalar(m["match"], f"{key}.match", str) if "match" in m else None
        mode = self.choice(m["mode"], f"{key}.mode", API_MODES) if "mode" in m else None
        translate = self.scalar(m["translate"], f"{key}.translate", bool) if "translate" in m else None
        if "mode" not in m and "translate" not in m:
            self.problem(node, key, "give 'mode' and/or 'translate'")
        if len(self.problems) > before:
            return None
        return ModelRule(match=match, mode=mode, translate=translate)
