"""The `backends:` section: each backend's API, models, and where its instances are."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.api import AUTO, BACKEND_APIS, BOTH, RESPONSES
from extproc.config.addresses import host_port, resolve
from extproc.config.model import CONVERSATION_HOLDERS, MAX_TOKENS_FIELDS, Backend, Endpoint, Hosted
from extproc.config.reader import Reader
from extproc.routing.key_paths import key_path_problem
from extproc.routing.providers import PROVIDERS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ALLOWED = {"name", "api", "models", "endpoints", "cluster", "path_prefix", "api_key_env",
            "translate", "chat_max_tokens_field", "vnodes", "hosted_tools", "replay_reasoning",
            "authenticates_callers", "url", "ca_file", "headers", "provider", "api_version", "deployments",
            "api_key_file", "key_paths", "weight", "conversations"}
_HOSTED_ONLY = ("ca_file", "headers", "provider", "api_version", "deployments")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Headers `headers:` may not set: the key's, and those Envoy or the sidecar own.
_RESERVED_HEADERS = {"authorization", "api-key", "host", "content-length", "content-type", "transfer-encoding",
                     "connection", "te", "upgrade", "proxy-authorization"}


def backends(r: Reader, root: yaml.Node, top: dict[str, yaml.Node]) -> list[Backend]:
    out: list[Backend] = []
    if "backends" not in top:
        r.problem(root, "backends", "required: list at least one backend")
    elif not isinstance(top["backends"], yaml.SequenceNode) or not top["backends"].value:
        r.problem(top["backends"], "backends", "must be a non-empty list")
    else:
        seen: set[str] = set()
        nodes: list[tuple[int, yaml.Node]] = []
        for i, bnode in enumerate(top["backends"].value):
            b = backend(r, bnode, f"backends[{i}]")
            if b is None:
                continue
            if b.name in seen:
                r.problem(bnode, f"backends[{i}].name", f"duplicate backend name {b.name!r}")
            seen.add(b.name)
            out.append(b)
            nodes.append((i, bnode))
        _no_cluster_members(r, out, nodes)
        holders = [(i, b) for i, b in enumerate(out) if b.holds_conversations]
        for i, _ in holders[1:]:  # POST /v1/conversations names no model: one backend must take it
            r.problem(top["backends"].value[i], f"backends[{i}].conversations",
                      f"only one backend may hold conversations ({holders[0][1].name!r} does already)")
    return out


def _no_cluster_members(r: Reader, found: list[Backend], nodes: list[tuple[int, yaml.Node]]) -> None:
    """A model name listed exactly by a `cluster:` backend and another backend would be a model group
    (routing.groups) that Envoy cannot carry: the sidecar fails over between the priorities of a
    cluster it compiles, and a `cluster:` is an Envoy cluster of the user's own, so it cannot be one of
    them. Refused, saying what serves instead, rather than quietly sending the model to the first alone."""
    listed: dict[str, list[Backend]] = {}
    for b in found:
        for model in dict.fromkeys(m for m in b.models if not any(c in m for c in "*?[")):
            listed.setdefault(model, []).append(b)
    for b, (i, bnode) in zip(found, nodes, strict=True):
        if not b.cluster:
            continue
        for model, members in listed.items():
            others = [o.name for o in members if o is not b]
            if b in members and others:
                where = next((v for k, v in bnode.value if k.value == "models"), bnode)  # (a parsed backend's mapping)
                r.problem(where, f"backends[{i}].models",
                          f"{model!r} is listed by {', '.join(repr(o) for o in others)} too, which makes it a model "
                          f"group, and a 'cluster:' backend ({b.name!r}, cluster {b.cluster!r}) cannot be a member of "
                          "one (the sidecar fails over between the priorities of a cluster it compiles itself): give "
                          f"{b.name!r} 'url:' (a hosted provider) or 'endpoints:' instead of 'cluster:', or list "
                          f"{model!r} on one of them only")


def backend(r: Reader, node: yaml.Node, key: str) -> Backend | None:
    m = r.mapping(node, key, _ALLOWED)
    before = len(r.problems)
    for req in ("name", "api", "models"):
        if req not in m:
            r.problem(node, f"{key}.{req}", "required")
    name = r.scalar(m["name"], f"{key}.name", str) if "name" in m else None
    if name is not None and not _NAME_RE.match(name):
        r.problem(m["name"], f"{key}.name", "use letters, digits, '.', '_' or '-' (at most 63)")
    api = r.choice(m["api"], f"{key}.api", BACKEND_APIS) if "api" in m else None
    models = r.string_list(m["models"], f"{key}.models") if "models" in m else []
    if "models" in m and not models:
        r.problem(m["models"], f"{key}.models", "must list at least one model name or pattern")
    endpoints, dns_names, dns_weights = _endpoints(r, m["endpoints"], f"{key}.endpoints") \
        if "endpoints" in m else ((), (), ())
    cluster = r.scalar(m["cluster"], f"{key}.cluster", str) if "cluster" in m else None
    if sum(k in m for k in ("endpoints", "cluster", "url")) != 1:
        r.problem(node, key, "give exactly one of 'endpoints' (instances the sidecar picks), 'url' (a hosted "
                             "provider: the sidecar compiles its Envoy cluster) or 'cluster' (an Envoy cluster "
                             "named in deploy/envoy.yaml)")
    for extra in (k for k in _HOSTED_ONLY if k in m and "url" not in m):
        r.problem(m[extra], f"{key}.{extra}", "only for a backend given by 'url'")
    hosted, prefix = _hosted(r, m, key, api) if "url" in m else (None, "")
    kw = _options(r, m, key)
    if prefix and "path_prefix" in m:
        r.problem(m["path_prefix"], f"{key}.path_prefix", "the url's path is the prefix already: give one of them")
    if len(r.problems) > before or name is None or api is None:
        return None
    if prefix:
        kw["path_prefix"] = prefix
    return Backend(name=name, api=api, models=tuple(models), endpoints=endpoints, cluster=cluster, hosted=hosted,
                   dns_names=dns_names, dns_weights=dns_weights, **kw)


def _hosted(r: Reader, m: dict[str, yaml.Node], key: str, api: str | None) -> tuple[Hosted | None, str]:
    """A `url:` backend: scheme, host, port and path prefix, its provider's row and the provider extras."""
    text = r.scalar(m["url"], f"{key}.url", str)
    if text is None:
        return None, ""
    parts = urlsplit(text)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if parts.scheme not in ("https", "http") or not parts.hostname or not 1 <= port <= 65535 or parts.username \
            or parts.password or parts.query or parts.fragment or "%" in parts.path:
        r.problem(m["url"], f"{key}.url", "must be https://host[:port][/path prefix] (http:// only for a "
                                          "provider on a trusted network), without credentials, query or fragment")
        return None, ""
    provider = r.choice(m["provider"], f"{key}.provider", tuple(PROVIDERS)) if "provider" in m else "openai"
    row = PROVIDERS.get(provider or "openai", PROVIDERS["openai"])
    if api is not None and api not in (AUTO, BOTH) and api not in row.apis:
        r.problem(m["api"], f"{key}.api", f"provider {row.name} serves {', '.join(row.apis)} only")
    ca_file = r.scalar(m["ca_file"], f"{key}.ca_file", str) if "ca_file" in m else None
    ca_pem = _pem(ca_file) if ca_file is not None else None
    if ca_file is not None and ca_pem is None:
        r.problem(m["ca_file"], f"{key}.ca_file", f"cannot read {ca_file} as a PEM certificate bundle")
    if ca_file is not None and parts.scheme != "https":
        r.problem(m["ca_file"], f"{key}.ca_file", "only with an https:// url")
    api_version = _text(r, m["api_version"], f"{key}.api_version") if "api_version" in m else None
    if api_version is not None and not row.versioned_paths:
        r.problem(m["api_version"], f"{key}.api_version", f"provider {row.name} has no versioned paths")
    deployments = _string_map(r, m["deployments"], f"{key}.deployments") if "deployments" in m else ()
    if deployments and not row.versioned_paths:
        r.problem(m["deployments"], f"{key}.deployments", f"provider {row.name} has no deployments")
    headers = _string_map(r, m["headers"], f"{key}.headers") if "headers" in m else ()
    for header, _ in headers:
        if not _HEADER_RE.match(header) or header.lower() in _RESERVED_HEADERS:
            r.problem(m["headers"], f"{key}.headers.{header}", "not a header name a provider extra may set "
                                                              f"(reserved: {', '.join(sorted(_RESERVED_HEADERS))})")
    prefix = parts.path.rstrip("/")
    return Hosted(parts.scheme, parts.hostname, port, row.name, ca_file, ca_pem,
                  tuple((h.lower(), v) for h, v in headers), api_version, deployments), prefix + (row.path_prefix if api_version is None else "")


def _pem(path: str) -> str | None:
    """A CA bundle's text (None: unreadable, or no certificate in it)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return text if "-----BEGIN CERTIFICATE-----" in text else None


def _text(r: Reader, node: yaml.Node, key: str) -> str | None:
    """A scalar as written (2024-10-21 stays text rather than becoming a date)."""
    if not isinstance(node, yaml.ScalarNode) or not node.value:
        r.problem(node, key, "must be a non-empty string")
        return None
    return str(node.value)


def _string_map(r: Reader, node: yaml.Node, key: str) -> tuple[tuple[str, str], ...]:
    """A mapping of strings to strings, in file order."""
    if not isinstance(node, yaml.MappingNode):
        r.problem(node, key, "must be a mapping of names to strings")
        return ()
    out: list[tuple[str, str]] = []
    for k, v in node.value:
        name = r.scalar(k, key, str)
        value = r.scalar(v, f"{key}.{name}", str)
        if name is not None and value is not None:
            out.append((name, value))
    return tuple(out)


def _options(r: Reader, m: dict[str, yaml.Node], key: str) -> dict[str, Any]:
    """The optional keys, each checked on its own."""
    kw: dict[str, Any] = {}
    if "path_prefix" in m:
        p = r.scalar(m["path_prefix"], f"{key}.path_prefix", str)
        if p is not None and p and (not p.startswith("/") or p.endswith("/")):
            r.problem(m["path_prefix"], f"{key}.path_prefix", "must start with '/' and not end with '/'")
        elif p is not None:
            kw["path_prefix"] = p
    if "api_key_env" in m and (var := r.env_name(m["api_key_env"], f"{key}.api_key_env")) is not None:
        value = r.env.get(var)
        if not value:
            r.warning(m["api_key_env"], f"{key}.api_key_env",
                      f"environment variable {var} is not set or empty: this backend's requests "
                      "get 503 backend_unconfigured until the sidecar runs with it set")
        kw["api_key_env"], kw["api_key"] = var, value
    if "api_key_file" in m and (path := r.scalar(m["api_key_file"], f"{key}.api_key_file", str)) is not None:
        if "api_key_env" in m:
            r.problem(m["api_key_file"], f"{key}.api_key_file", "give one of api_key_env and api_key_file")
        kw["api_key_file"], kw["api_key"] = path, read_key(path)
        if kw["api_key"] is None:
            r.warning(m["api_key_file"], f"{key}.api_key_file",
                      f"{path} is missing or empty: this backend's requests get 503 backend_unconfigured "
                      "until it holds a key (the sidecar re-reads it when it changes)")
    if "authenticates_callers" in m:
        kw["authenticates_callers"] = r.scalar(m["authenticates_callers"], f"{key}.authenticates_callers", bool)
        if kw["authenticates_callers"] and ("api_key_env" in m or "api_key_file" in m):
            r.problem(m["authenticates_callers"], f"{key}.authenticates_callers",
                      "a backend sent the sidecar's own key (api_key_env) sees one caller, never each "
                      "caller's key: it cannot tell callers apart")
    if "translate" in m:
        kw["translate"] = r.scalar(m["translate"], f"{key}.translate", bool)
    if "chat_max_tokens_field" in m:
        kw["chat_max_tokens_field"] = r.choice(
            m["chat_max_tokens_field"], f"{key}.chat_max_tokens_field", MAX_TOKENS_FIELDS)
    if "hosted_tools" in m:
        kw["hosted_tools"] = r.choice(m["hosted_tools"], f"{key}.hosted_tools", ("drop", "reject"))
    if "replay_reasoning" in m:
        kw["replay_reasoning"] = r.scalar(m["replay_reasoning"], f"{key}.replay_reasoning", bool)
    if "conversations" in m:
        kw["conversations"] = r.choice(m["conversations"], f"{key}.conversations", CONVERSATION_HOLDERS)
        api = m["api"].value if "api" in m else None
        if kw["conversations"] == "passthrough" and api not in (RESPONSES, BOTH):
            r.problem(m["conversations"], f"{key}.conversations",
                      "passthrough needs a backend declared api: responses or both (its Conversations API)")
    if "vnodes" in m:
        kw["vnodes"] = r.bounded(m["vnodes"], f"{key}.vnodes", 1, 4096)
    if "weight" in m:
        kw["weight"] = r.bounded(m["weight"], f"{key}.weight", 1, 10000)
    if "key_paths" in m:
        kw["key_paths"] = tuple(r.string_list(m["key_paths"], f"{key}.key_paths"))
        for why in filter(None, map(key_path_problem, kw["key_paths"])):
            r.problem(m["key_paths"], f"{key}.key_paths", why)
    return kw


def read_key(path: str) -> str | None:
    """A key file's key (a mounted Secret holds it with or without a final newline); None when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _endpoints(r: Reader, node: yaml.Node, key: str) -> tuple[tuple[Endpoint, ...], tuple[str, ...], tuple[int, ...]]:
    """The endpoints, and the `dns:` names among them (re-resolved while running)."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        r.problem(node, key, "must be a non-empty list of 'host:port' or {address, weight}")
        return (), (), ()
    out: list[Endpoint] = []
    dns_names: list[str] = []
    dns_weights: list[int] = []
    for i, item in enumerate(node.value):
        k = f"{key}[{i}]"
        entry = _entry(r, item, k)
        if entry is None:
            continue
        addr_node, addr, weight, every_address = entry
        if every_address:
            dns_names.append(addr)
            dns_weights.append(weight)
        resolved = resolve(addr, every_address)
        if not resolved and every_address and host_port(addr) is not None:
            r.warning(addr_node, k, f"{addr!r} does not resolve now: no instances until it does (re-resolved "
                                    "every discovery.interval_seconds); its requests get 503 no_endpoints")
            continue
        if not resolved:
            r.problem(addr_node, k, f"{addr!r} is not 'host:port' with a resolvable host and a port 1-65535")
            continue
        for address in resolved:
            if any(e.address == address for e in out):
                r.problem(addr_node, k, f"duplicate endpoint {address}")
                continue
            out.append(Endpoint(address, weight, addr if every_address else None))
    return tuple(out), tuple(dns_names), tuple(dns_weights)


def _entry(r: Reader, item: yaml.Node, k: str) -> tuple[yaml.Node, str, int, bool] | None:
    """One `endpoints:` item: its address node and text, its weight, and whether it is a `dns:` name."""
    weight = 1
    every_address = False
    addr_node = item
    if isinstance(item, yaml.MappingNode):
        m = r.mapping(item, k, {"address", "dns", "weight"})
        if ("address" in m) == ("dns" in m):
            r.problem(item, k, "give exactly one of 'address' (one instance) or 'dns' (every address "
                               "a name resolves to, e.g. a headless Service)")
            return None
        every_address = "dns" in m
        if "weight" in m:
            weight = r.scalar(m["weight"], f"{k}.weight", int) or 0
            if not 1 <= weight <= 100:
                r.problem(m["weight"], f"{k}.weight", "must be between 1 and 100")
                return None
        addr_node = m["dns" if every_address else "address"]
    addr = r.scalar(addr_node, k, str)
    return None if addr is None else (addr_node, addr, weight, every_address)
