"""The typed configuration: what a valid YAML file becomes (`extproc.config.validate` builds it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from extproc.clients import Clients
from extproc.config.addresses import resolve

MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")
CONVERSATION_HOLDERS = ("sidecar", "passthrough")  # a backend's `conversations:`: who holds them

_T = TypeVar("_T")


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
class Hosted:
    """A provider reached by `url:`: the sidecar compiles its Envoy cluster (DNS, TLS, SNI, SAN check)."""

    scheme: str  # https | http (http only for a provider on loopback or a private network)
    host: str
    port: int
    provider: str = "openai"  # a row of routing.providers.PROVIDERS: its auth header and scheme, its APIs
    ca_file: str | None = None  # a PEM bundle that replaces the system trust store
    ca_pem: str | None = field(default=None, repr=False)  # its text, read at load (Envoy gets it inline)
    headers: tuple[tuple[str, str], ...] = ()  # provider extras sent with every request (HTTP-Referer, ...)
    api_version: str | None = None  # Azure's api-version query (its classic deployment paths)
    deployments: tuple[tuple[str, str], ...] = ()  # Azure: client model name -> deployment name

    def deployment(self, model: str) -> str:
        """The Azure deployment a model is sent to: its own name unless `deployments` maps it."""
        return dict(self.deployments).get(model, model)

    @property
    def authority(self) -> str:
        """The Host header the provider expects: its name, with the port when it is not the scheme's own."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Backend:
    name: str
    api: str  # chat | responses | both
    models: tuple[str, ...]
    endpoints: tuple[Endpoint, ...] = ()
    cluster: str | None = None
    hosted: Hosted | None = None  # `url:` given: a provider whose cluster the sidecar compiles
    path_prefix: str = ""
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # resolved from api_key_env, never logged
    api_key_file: str | None = None  # the key read from this file (a mounted Secret), re-read when it changes
    # The backend checks each caller's own key (sent on as the client gave it), so a response id the
    # sidecar never recorded may be sent there for it to judge; otherwise such ids are refused.
    authenticates_callers: bool = False
    translate: bool = True
    chat_max_tokens_field: str = "max_completion_tokens"
    vnodes: int = 160
    hosted_tools: str = "drop"  # Responses hosted tools (web_search, ...) for a chat backend: drop | reject
    replay_reasoning: bool = False  # send earlier turns' reasoning back as reasoning_content
    dns_names: tuple[str, ...] = ()  # `dns:` entries: re-resolved periodically, the ring follows them
    dns_weights: tuple[int, ...] = ()  # the weight of each `dns:` entry
    key_paths: tuple[str, ...] = ()  # paths besides the API's that get the key (extproc/routing/key_paths.py)
    weight: int | None = None  # in a model group: members with a weight share first attempts by it (routing.groups)
    # Who holds conversations (/v1/conversations, a turn's `conversation`): the sidecar (default), or,
    # with `passthrough`, this Responses backend's own Conversations API, pinned (state.conversations).
    conversations: str = "sidecar"  # one of CONVERSATION_HOLDERS

    def unserved(self) -> Unserved | None:
        """Why requests for this backend cannot be sent now (None: they can). The sidecar still starts,
        so one backend's missing secret or not-yet-resolvable name does not take the others down."""
        if self.api_key_env and not self.api_key:
            return Unserved("backend_unconfigured", f"Backend '{self.name}' is not configured: the environment "
                                                    f"variable {self.api_key_env} (its api_key_env) is not set "
                                                    "in the gateway sidecar")
        if self.api_key_file and not self.api_key:
            return Unserved("backend_unconfigured", f"Backend '{self.name}' is not configured: its api_key_file "
                                                    f"{self.api_key_file} is missing or empty in the gateway sidecar")
        if self.cluster is None and self.hosted is None and not self.endpoints:
            return Unserved("no_endpoints", f"Backend '{self.name}' has no instances: "
                                            f"{', '.join(self.dns_names)} resolves to no address yet")
        return None

    @property
    def holds_conversations(self) -> bool:
        """`conversations: passthrough`: the Conversations API is this backend's, its ids pinned."""
        return self.conversations == "passthrough"

    @property
    def keyed(self) -> bool:
        """The sidecar sends this backend a key of its own (from api_key_env or api_key_file)."""
        return bool(self.api_key_env or self.api_key_file)

    def resolve_dns(self) -> tuple[Endpoint, ...] | None:
        """The endpoints with the `dns:` entries resolved again (None when a name does not resolve now:
        keep the last known ones)."""
        dns = set(self.dns_names)
        fixed = [e for e in self.endpoints if e.source not in dns]
        for name, weight in zip(self.dns_names, self.dns_weights, strict=True):
            resolved = resolve(name, every_address=True)
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
    websocket_max_seconds: int = 3600  # how long one WebSocket-mode socket lives (OpenAI's limit: 60 minutes)
    background_max_runs: int = 32  # background responses a replica runs at once on chat-only backends
    background_max_seconds: int = 3600  # how long one background run may take before it is failed
    background_max_events: int = 50_000  # events a streamed background run's log keeps (then it is failed)
    background_max_event_bytes: int = 16 * 1024 * 1024  # bytes of events the log keeps (likewise)
    background_lease_seconds: int = 15  # a run renews its lease each third of this; one not renewed is lost


@dataclass(frozen=True)
class Failover:
    """How a request for a model served by several backends (a group, extproc/routing/groups.py) moves
    between them, and when a failing member is taken out (Envoy's outlier detection, in the same terms)."""

    max_attempts: int = 3  # backends tried for one request, the first included
    deadline_seconds: int = 60  # no new attempt starts this long after the request's first
    eject_after: int = 5  # consecutive failures that take a member out (Envoy's consecutive_5xx)
    eject_seconds: int = 30  # out for this long times the number of times it was taken out (base_ejection_time)
    max_eject_seconds: int = 300  # the cap on that, and on a retry-after hold (max_ejection_time)
    attempt_timeout_seconds: int = 30  # one attempt silent this long before its answer starts: the next member

    @property
    def attempt_timeout(self) -> int:
        """Envoy's per-try timeout: no attempt outlives the deadline (a later one would not start anyway)."""
        return min(self.attempt_timeout_seconds, self.deadline_seconds)


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
    failover: Failover = Failover()
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

    def derived(self, build: Callable[[Config], _T]) -> _T:
        """`build(self)`, computed once and kept on this config: state derived from a config (its model
        groups, ...) lives and dies with it, so a reload can never be answered from an older config's."""
        memo: dict[object, object] = self.__dict__.setdefault("_derived", {})
        if build not in memo:
            memo[build] = build(self)
        return memo[build]  # type: ignore[return-value]  # keyed by `build`, whose result it is

    def backend(self, name: str) -> Backend | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None
