"""The sidecar's decisions compiled into Envoy routes and clusters: the fast path (sans-IO, pure).

Envoy's `json_to_metadata` filter puts the body's `model` (and the few fields that say what else the
request needs) into dynamic metadata (`envoy.names`); the routes compiled here match on it. A request
whose needs (`routing.needs`) Envoy alone can meet goes straight to its backend with the processor
disabled for that route (`ExtProcPerRoute.disabled`): for each model and client API, `needs.survey`
says under which combinations of the facts Envoy sees, and those become the route's conditions.
Everything else falls through to the routes the processor needs.

The route list is ordered so that Envoy's first match gives the same answer as `Classifier.resolve`:
first every model name known exactly (config, `/v1/models`, learned), each routed by `resolve`
itself; then, for names only globs match, one route per combination of the first matching backend
glob, model rule glob and catalogue glob (`classify.combine` decides each), collapsed where the
decision does not depend on the finer ones. Names no route matches keep the processor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as ratelimit_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from extproc.api import AUTO, BOTH, PATHS, RESPONSES
from extproc.clients import lua_source
from extproc.config import Backend, Config
from extproc.envoy.names import (
    H_BACKEND,
    H_CLUSTER,
    H_ENDPOINT,
    H_FIRST_CONTACT,
    H_FOLLOW,
    H_RETRY,
    MODE_HEADER,
    NAMESPACE,
    REFUSED_HEADER,
    SESSION_HEADERS,
    TENANT_HEADER,
    Key,
)
from extproc.routing import group_routes
from extproc.routing.catalogue import CATALOGUE
from extproc.routing.classify import Classifier, Resolution, combine, is_glob
from extproc.routing.gateway import backend_cluster
from extproc.routing.groups import group_for
from extproc.routing.hosted import first_contact_cluster, hosted_clusters, lb_endpoint, secrets
from extproc.routing.model_name import FAST_PATH_NAME
from extproc.routing.modes import Knowledge, Learned
from extproc.routing.needs import Condition, envoy_can, explain, ordered, survey

ROUTE_CONFIG = "llm"  # the route configuration deploy/envoy.yaml asks for over RDS
FAST = "fast"  # route names "fast:<api>:<backend>": the access-log service counts these
ENDPOINTS_CLUSTER = "endpoints"  # ORIGINAL_DST cluster for instances the processor picked
FIRST_CONTACT_CLUSTER = "endpoints_first_contact"  # the same, with the processor as upstream filter
WEBSOCKET_CLUSTER = "websocket"  # the sidecar's WebSocket front door
NO_ROUTE = b'{"error":{"message":"no backend selected","type":"invalid_request_error","param":null,"code":"no_route"}}'


@dataclass(frozen=True)
class PathChoice:
    """Which path a model's requests take for one client API, and why (`extproc resolve` prints it)."""

    fast: bool
    reason: str


def decide(config: Config, res: Resolution | None, client_api: str, learned: Learned | None = None,
           where: str | None = None) -> PathChoice:
    """The path for a client API, read from `needs.survey`: fast when some requests need only what Envoy
    alone can do; the reason names what keeps the others on the processor (and `where` Envoy sends the
    fast ones, when not to the backend itself: `decide_group`)."""
    s, can = survey(config, res, client_api, learned), envoy_can(config)
    if not s.when:
        return PathChoice(False, explain(ordered(s.plain - can)[0], res, client_api))
    assert res is not None
    where = where or (f"cluster {backend_cluster(res.backend)}" if res.backend.cluster or res.backend.hosted else
                      f"{len(res.backend.endpoints)} instance(s) of {backend_cluster(res.backend)}")
    others = [explain(n, res, client_api) for n in ordered(s.sometimes - can)]
    return PathChoice(True, f"Envoy routes it to {where}" +
                      (f"; these keep the processor: {'; '.join(others)}" if others else ""))


# -- matchers -------------------------------------------------------------------------------------

_RE2_SPECIAL = set("\\.+*?()|[]{}^$")


def glob_regex(pattern: str) -> str:
    """An fnmatch glob as an RE2 full-match regex (Envoy's safe_regex); never matches the empty name."""
    if set(pattern) == {"*"}:
        return "(?s).+"
    out, i = ["(?s)"], 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := pattern.find("]", i + 1 if pattern[i:i + 1] in ("!", "]") else i)) != -1:
            body = pattern[i:end]
            i = end + 1
            neg = body.startswith("!")
            body = (body[1:] if neg else body).replace("\\", "\\\\").replace("[", "\\[").replace("^", "\\^")
            out.append("[" + ("^" if neg else "") + body + "]")
        else:
            out.append("\\" + c if c in _RE2_SPECIAL else c)
    return "".join(out)


def _meta(key: str, value: value_pb2.ValueMatcher, invert: bool = False) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(filter=NAMESPACE, path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
                                        value=value, invert=invert)


def model_in(names: list[str]) -> metadata_pb2.MetadataMatcher:
    """One of these exact names: one route for many (a discovered list can name hundreds)."""
    exact = [value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=n)) for n in names]
    return _meta(Key.MODEL, exact[0] if len(exact) == 1 else
                 value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=exact)))


def model_glob(pattern: str) -> metadata_pb2.MetadataMatcher:
    return model_globs([pattern])


def model_globs(patterns: list[str]) -> metadata_pb2.MetadataMatcher:
    """A name any of these globs matches."""
    each = [value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(regex=glob_regex(p)))) for p in patterns]
    return _meta(Key.MODEL, each[0] if len(each) == 1 else
                 value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=each)))


# How Envoy sees each boolean of `needs.Facts`: a header present, or a metadata key (json_to_metadata's)
# with the matcher that matches when the fact holds (True) or when it does not (False).
_FACT_HEADERS = {"content_encoding": "content-encoding", "mode_header": MODE_HEADER}
_PRESENT = value_pb2.ValueMatcher(present_match=True)
_FACT_METADATA: dict[str, tuple[str, value_pb2.ValueMatcher, bool]] = {
    "stream": (Key.STREAM, value_pb2.ValueMatcher(bool_match=True), True),
    "include_usage": (Key.INCLUDE_USAGE, value_pb2.ValueMatcher(bool_match=True), True),
    "stored": (Key.STORE, value_pb2.ValueMatcher(bool_match=False), False),
    "previous_response_id": (Key.PREVIOUS_RESPONSE_ID, _PRESENT, True),
    "conversation": (Key.CONVERSATION, _PRESENT, True)}

# Names the processor would refuse (routing/model_name.py) never take a fast route: it refuses them.
_SANE_NAME = _meta(Key.MODEL, value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(
    safe_regex=regex_pb2.RegexMatcher(regex=FAST_PATH_NAME))))
# Nor a body that may name `model` twice (Envoy routes by one, the backend may run the other): the processor
# refuses a duplicated key.
_ONE_MODEL = _meta(Key.MODEL_TWICE, _PRESENT, invert=True)


def _condition(cond: Condition) -> tuple[list[metadata_pb2.MetadataMatcher], list[rc.HeaderMatcher]]:
    """One alternative of `needs.Survey.when` as route matchers."""
    meta, headers = [], []
    for fact, holds in cond:
        if fact in _FACT_HEADERS:
            headers.append(rc.HeaderMatcher(name=_FACT_HEADERS[fact], present_match=True, invert_match=not holds))
        else:
            key, matcher, matches_when = _FACT_METADATA[fact]
            meta.append(_meta(key, matcher, invert=holds != matches_when))
    return meta, headers


# -- routes -------------------------------------------------------------------------------------

def _any(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


_NO_PROCESSOR = {"envoy.filters.http.ext_proc": _any(ext_proc_pb2.ExtProcPerRoute(disabled=True))}
# deploy/envoy.yaml lists ext_proc as disabled, so a request Envoy refuses before matching a route gets
# Envoy's answer at once; every request a route takes has the processor through the virtual host
# (and routes with _NO_PROCESSOR turn it off again).
_WITH_PROCESSOR = {"envoy.filters.http.ext_proc": _any(rc.FilterConfig(config=_any(
    ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides()))))}


def _to_backend(config: Config, cluster: str, **kw: Any) -> rc.RouteAction:
    """A route's action toward a backend. `upstream_timeout_seconds` bounds how long the upstream may stay
    silent (Envoy's 504 before the answer starts), not the whole answer: a total bound would cut a long
    stream that is still sending, mid-way, with no terminal event a client could read."""
    return rc.RouteAction(cluster=cluster, timeout=duration_pb2.Duration(seconds=0),
                          idle_timeout=duration_pb2.Duration(seconds=config.limits.upstream_timeout_seconds), **kw)


def fast_route(config: Config, backend: Backend, client_api: str,
               models: list[metadata_pb2.MetadataMatcher], when: tuple[Condition, ...],
               group: tuple[Backend, ...] = ()) -> list[rc.Route]:
    """Straight to the backend, one route per alternative of `when`; for a model `group` (`backend` its
    primary), to the group's own cluster, Envoy retrying on the next member (routing/group_routes.py)."""
    path = PATHS[client_api]
    action = _to_backend(config, group_routes.fast_cluster(group), retry_policy=group_routes.fast_retry(config, group)) \
        if group else _to_backend(config, backend_cluster(backend))
    group_routes.spread(action, group)
    _host(action, backend)
    if len(backend.endpoints) > 1:  # prefix-cache affinity where the request carries a session
        action.hash_policy.extend(rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=h),
                                                            terminal=True) for h in SESSION_HEADERS)
    if backend.path_prefix:
        action.prefix_rewrite = backend.path_prefix + path
    target = group_routes.group_cluster(group) if group else backend.name
    return [rc.Route(name=f"{FAST}:{client_api}:{target}", route=action, typed_per_filter_config=_NO_PROCESSOR,
                     request_headers_to_remove=[MODE_HEADER],  # the client's to the gateway, not the backend's
                     match=rc.RouteMatch(path=path, headers=headers, dynamic_metadata=[_SANE_NAME, _ONE_MODEL, *models, *meta]))
            for meta, headers in map(_condition, when)]


def processor_route(client_api: str, models: list[metadata_pb2.MetadataMatcher]) -> rc.Route:
    """Keeps these names on the processor even when a later (broader) fast route would match them."""
    return rc.Route(name="processor", match=rc.RouteMatch(path=PATHS[client_api], dynamic_metadata=models),
                    direct_response=_no_route())


def _no_route() -> rc.DirectResponseAction:
    return rc.DirectResponseAction(status=404, body=base_pb2.DataSource(inline_bytes=NO_ROUTE))


# The sidecar's routing headers, removed once Envoy has routed by them: no upstream needs them. (The
# ORIGINAL_DST clusters pick the instance from them after routing: deploy/envoy.yaml removes them there,
# in an upstream filter.)
_ROUTED_BY = [H_BACKEND, H_CLUSTER, H_ENDPOINT]


def processor_routes(config: Config) -> tuple[list[rc.Route], list[rc.Route]]:
    """(first, last): the routes the processor's headers select, and the catch-all that sends a request
    to the processor (ext_proc runs on it; after its routing headers the route is matched again)."""
    def present(*names: str) -> list[rc.HeaderMatcher]:
        return [rc.HeaderMatcher(name=n, present_match=True) for n in names]

    # WebSocket mode of /v1/responses: the sidecar's front door takes the socket and sends each message
    # back through this listener as a request of its own, so no processor on the socket itself.
    websocket = rc.Route(name="websocket", typed_per_filter_config=_NO_PROCESSOR, match=rc.RouteMatch(
        path=PATHS[RESPONSES], headers=[rc.HeaderMatcher(name="upgrade", string_match=string_pb2.StringMatcher(
            exact="websocket", ignore_case=True)), rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(
                exact="GET"))]), route=rc.RouteAction(
        cluster=WEBSOCKET_CLUSTER, timeout=duration_pb2.Duration(seconds=0),
        upgrade_configs=[rc.RouteAction.UpgradeConfig(upgrade_type="websocket", enabled=wrappers_pb2.BoolValue(value=True))]))
    # First contact with a model of unknown API: a rejection naming the other API becomes one retry
    # (x-gateway-retry, set by the processor as the cluster's upstream filter), translated there.
    retry = rc.RetryPolicy(retry_on="retriable-headers", num_retries=wrappers_pb2.UInt32Value(value=1),
                           retriable_headers=present(H_RETRY))
    # A background response's stream (the processor's x-gateway-follow): the front door reads its event log.
    follow = rc.Route(name="processor:follow", match=rc.RouteMatch(prefix="/", headers=present(H_FOLLOW)),
                      route=rc.RouteAction(cluster=WEBSOCKET_CLUSTER, timeout=duration_pb2.Duration(seconds=0)))
    first = [websocket, follow, *group_routes.routes(config),  # a model group's attempts (routing/group_routes.py)
             rc.Route(name="processor:first-contact", match=rc.RouteMatch(prefix="/", headers=present(
                 H_ENDPOINT, H_FIRST_CONTACT)), route=_to_backend(config, FIRST_CONTACT_CLUSTER, retry_policy=retry)),
             rc.Route(name="processor:endpoint", match=rc.RouteMatch(prefix="/", headers=present(H_ENDPOINT)),
                      route=_to_backend(config, ENDPOINTS_CLUSTER))]
    for backend in {backend_cluster(b): b for b in config.backends if b.cluster or b.hosted}.values():
        cluster = backend_cluster(backend)
        if (twin := first_contact_cluster(backend)) is not None:  # as processor:first-contact, for a url: backend
            first.append(_first_contact_route(config, backend, twin, retry))
        action = _to_backend(config, cluster)
        _host(action, backend)
        first.append(rc.Route(name=f"processor:{cluster}", route=action, request_headers_to_remove=_ROUTED_BY,
                              match=rc.RouteMatch(prefix="/", headers=[
            rc.HeaderMatcher(name=H_CLUSTER, string_match=string_pb2.StringMatcher(exact=cluster))])))
    return first, [rc.Route(name="processor", match=rc.RouteMatch(prefix="/"), direct_response=_no_route())]


def _first_contact_route(config: Config, backend: Backend, cluster: str, retry: rc.RetryPolicy) -> rc.Route:
    action = _to_backend(config, cluster, retry_policy=retry)
    _host(action, backend)
    return rc.Route(name=f"processor:first-contact:{backend_cluster(backend)}", route=action, match=rc.RouteMatch(
        prefix="/", headers=[rc.HeaderMatcher(name=H_CLUSTER, string_match=string_pb2.StringMatcher(
            exact=backend_cluster(backend))), rc.HeaderMatcher(name=H_FIRST_CONTACT, present_match=True)]))


def _host(action: rc.RouteAction, backend: Backend) -> None:
    """The Host a cluster backend expects: a provider's own name, or the name of an Envoy cluster's host."""
    if backend.hosted is not None:
        action.host_rewrite_literal = backend.hosted.authority
    elif backend.cluster is not None:
        action.auto_host_rewrite.value = True


@dataclass(frozen=True)
class Compiled:
    routes: route_pb2.RouteConfiguration
    clusters: list[cluster_pb2.Cluster]
    secrets: list[secret_pb2.Secret]


def exact_names(config: Config, knowledge: Knowledge, learned: dict[tuple[str, str], Learned]) -> list[str]:
    """Every model name something names exactly, in a stable order."""
    names = [m for b in config.backends for m in b.models]
    names += [r.match for r in config.model_rules] + [p for p, _ in CATALOGUE]
    names += [m for models in knowledge.discovered.values() for m in models] + [m for _, m in learned]
    return [n for n in dict.fromkeys(names) if not is_glob(n)]


When = tuple[Condition, ...]  # needs.Survey.when: () keeps the processor


class _Surveys:
    """`needs.survey` once per distinct (resolution, learned fact, client API): names decided alike share
    it, so hundreds of names and glob combinations cost a few surveys. A resolution's `source` only
    names the rule that decided, for people, so it is no part of the key."""

    def __init__(self, config: Config):
        self.config = config
        self.seen: dict[tuple[Any, ...], When] = {}

    def when(self, res: Resolution | None, client_api: str, learned: Learned | None = None) -> When:
        key = (replace(res, source="") if res else None, client_api,
               (learned.mode, frozenset(learned.ok)) if learned else None)
        if key not in self.seen:
            self.seen[key] = survey(self.config, res, client_api, learned).when
        return self.seen[key]


def _glob_routes(config: Config, surveys: _Surveys, client_api: str) -> Iterable[rc.Route]:
    """Routes for names only globs match: first backend glob x first rule glob x first catalogue glob,
    in that order of precedence (Envoy's first match then gives each dimension's first match)."""
    rules = [(i, r) for i, r in enumerate(config.model_rules) if is_glob(r.match)]
    catalogue = [(p, mode) for p, mode in CATALOGUE if is_glob(p)]
    for backend in config.backends:
        cat_dim: list[tuple[str, str] | None] = [*catalogue, None] if backend.api in (AUTO, BOTH) else [None]
        for pattern in (p for p in backend.models if is_glob(p)):
            rows: dict[str, list[tuple[str | None, When]]] = {}
            rule_entries: list[tuple[str | None, When | str]] = []
            for r in [*rules, None]:
                row = [(c[0] if c else None, surveys.when(combine(backend, r, c, None, None), client_api))
                       for c in cat_dim]
                uniform = {when for _, when in row}
                key: When | str = uniform.pop() if len(uniform) == 1 else f"row{len(rows)}"
                if isinstance(key, str):
                    rows[key] = row
                rule_entries.append((r[1].match if r else None, key))
            for globs, key in _runs(rule_entries):
                with_rule = [model_glob(pattern)] + ([model_globs(globs)] if globs else [])
                if not isinstance(key, str):
                    yield from _routes(config, backend, client_api, with_rule, key)
                    continue
                for cat_globs, when in _runs(rows[key]):
                    yield from _routes(config, backend, client_api,
                                       with_rule + ([model_globs(cat_globs)] if cat_globs else []), when)


V = TypeVar("V")


def _runs(entries: list[tuple[str | None, V]]) -> list[tuple[list[str] | None, V]]:
    """(glob, decision) in order, the last one the catch-all (None): consecutive globs with the same
    decision become one route; the run just before the catch-all goes when the catch-all decides alike."""
    out: list[tuple[list[str] | None, V]] = []
    for glob, value in entries:
        last = out[-1] if out else None
        if glob is not None and last is not None and last[0] is not None and last[1] == value:
            last[0].append(glob)
        else:
            out.append(([glob] if glob is not None else None, value))
    if len(out) >= 2 and out[-1][0] is None and out[-2][1] == out[-1][1]:
        del out[-2]
    return out


def _routes(config: Config, backend: Backend, client_api: str, models: list[metadata_pb2.MetadataMatcher],
            when: When) -> list[rc.Route]:
    return fast_route(config, backend, client_api, models, when) if when else [processor_route(client_api, models)]


def compile_routes(config: Config, knowledge: Knowledge, learned: dict[tuple[str, str], Learned]) -> Compiled:
    """Routes and clusters for the current config, discoveries and learned facts (`learned` from the
    state store, by (backend, model)): the same decisions `Classifier.resolve` and `needs` make per request."""
    classifier = Classifier(config, knowledge)
    surveys = _Surveys(config)
    first, last = processor_routes(config)
    middle: list[rc.Route] = []
    for client_api in PATHS:  # every client API family
        # by fast-path backend and conditions (None: processor); names never overlap
        groups: dict[tuple[Backend, When] | None, list[str]] = {}
        fast_groups: dict[tuple[tuple[Backend, ...], When], list[str]] = {}
        for name in exact_names(config, knowledge, learned):
            backend = classifier.backend_for(name)
            if backend is None:
                continue
            fact = learned.get((backend.name, name))
            members = _carried(config, name)
            if members:  # a model group: fast to its cluster when every member needs only Envoy alike
                when = _group_when(surveys, classifier, members, name, client_api, learned)
                if when:
                    fast_groups.setdefault((members, when), []).append(name)
                    continue
            else:
                when = surveys.when(classifier.resolve(name, learned=fact), client_api, fact)
            groups.setdefault((backend, when) if when else None, []).append(name)
        for group, names in groups.items():
            middle += fast_route(config, group[0], client_api, [model_in(names)], group[1]) if group else \
                [processor_route(client_api, [model_in(names)])]
        for (members, when), names in fast_groups.items():
            middle += fast_route(config, members[0], client_api, [model_in(names)], when, members)
        middle += _glob_routes(config, surveys, client_api)
    while middle and middle[-1].name == "processor":  # the catch-all does the same
        middle.pop()
    host = rc.VirtualHost(name=ROUTE_CONFIG, domains=["*"], routes=first + middle + last, typed_per_filter_config=_WITH_PROCESSOR,
                          include_request_attempt_count=True)  # the first-contact processor tells attempts apart
    _client_keys(config, host)
    return Compiled(route_pb2.RouteConfiguration(name=ROUTE_CONFIG, virtual_hosts=[host]),
                    [_cluster(b) for b in config.backends if b.endpoints] +
                    [c for b in config.backends if b.hosted for c in hosted_clusters(b)] +
                    group_routes.clusters(config), secrets(config))


def _carried(config: Config, model: str) -> tuple[Backend, ...]:
    """The members of a model's group, which Envoy carries (none: not a group; a `cluster:` member is
    refused by the config). Such a model never has a fast route to its primary alone."""
    group = group_for(config, model)
    return group.backends if group is not None else ()


def _group_when(surveys: _Surveys, classifier: Classifier, members: tuple[Backend, ...], model: str, client_api: str,
                learned: dict[tuple[str, str], Learned]) -> When:
    """When a grouped model's requests take the fast path: when they would on every member, under the
    same conditions, and the members' paths agree (one route rewrites them all); else never (the
    processor's attempts carry them). Never with a `url:` member: its Host and key are put on by the
    processor, per attempt (routing/group_routes.py)."""
    if any(b.hosted is not None for b in members):
        return ()
    whens = {surveys.when(classifier.resolve_on(b, model, learned=learned.get((b.name, model))), client_api,
                          learned.get((b.name, model))) for b in members}
    return whens.pop() if len(whens) == 1 and len({b.path_prefix for b in members}) == 1 else ()


def decide_group(config: Config, classifier: Classifier, model: str, client_api: str,
                 learned: Learned | None = None) -> PathChoice:
    """`decide` for a grouped model (`extproc resolve`), as the compiled routes take it: the fast path,
    to the group's fast cluster, only when every member would take it alike (`_group_when`); else
    every request goes to the processor, whose attempts carry it. `learned` is the primary's."""
    members = _carried(config, model)
    facts = {(members[0].name, model): learned} if learned is not None else {}
    choice = decide(config, classifier.resolve_on(members[0], model, learned=learned), client_api, learned,
                    where=f"the group's cluster {group_routes.fast_cluster(members)}, retrying on the next member")
    if choice.fast and not _group_when(_Surveys(config), classifier, members, model, client_api, facts):
        return PathChoice(False, "a model group whose members do not all take the fast path alike (their APIs, "
                                 "keys, path prefixes or a url: member): the processor's attempts carry it")
    return choice


CLIENT_FILTERS = {"envoy.filters.http.lua.clients": "key", "envoy.filters.http.lua.client_models": "models"}
RATE_LIMIT_FILTER = "envoy.filters.http.ratelimit"


def _client_keys(config: Config, host: rc.VirtualHost) -> None:
    """The `clients` section for deploy/envoy.yaml's two Lua stages (key, then model allow-list): the
    script with the keys' hashes, on every route; the tenant header Envoy sets stays out of upstreams.
    The file lists both stages and the rate-limit filter as disabled, so each is turned on here only
    when something needs it (the allow-list stage when a key has `models`, the rate limits when a
    tenant has limits): a filter with nothing to do still cost each fast-path request its setup.
    A request the script refuses is marked and takes the first route, which has no processor: the
    refusal then costs the sidecar nothing (its ext_proc stream cost 0.75 ms of CPU, measured)."""
    if config.clients is None:
        return
    entries = config.clients.entries
    for name, stage in CLIENT_FILTERS.items():
        if stage == "models" and not any(c.models is not None for c in entries):
            continue
        host.typed_per_filter_config[name].Pack(rc.FilterConfig(config=_any(lua_pb2.LuaPerRoute(
            source_code=base_pb2.DataSource(inline_string=lua_source(config.clients, stage))))))
    if any(c.limits.any for c in entries):
        host.typed_per_filter_config[RATE_LIMIT_FILTER].Pack(rc.FilterConfig(config=_any(
            ratelimit_pb2.RateLimitPerRoute())))  # the filter's own rate_limits, as written in the file
    host.request_headers_to_remove.append(TENANT_HEADER)
    refused = rc.Route(name="refused", typed_per_filter_config=_NO_PROCESSOR, direct_response=_no_route(),
                       match=rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(name=REFUSED_HEADER, present_match=True)]))
    host.routes.insert(0, refused)


def _cluster(backend: Backend) -> cluster_pb2.Cluster:
    """A backend's instances for the fast path: ring hash (on the session headers) when there are several."""
    name = backend_cluster(backend)
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration_pb2.Duration(seconds=5),
        lb_policy=cluster_pb2.Cluster.RING_HASH if len(backend.endpoints) > 1 else cluster_pb2.Cluster.ROUND_ROBIN,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb_endpoint(e.address, e.weight)
                                                                      for e in backend.endpoints])]))
