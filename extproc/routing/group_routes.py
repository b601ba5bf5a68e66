"""A model group's members as one Envoy cluster, and the route that fails over between them (sans-IO, pure).

Why this shape (measured against Envoy 1.40, docs/configuration.md "How failover is made"):

- Envoy owns the attempts, the buffered body and the retries, as at first contact. Each order of a
  group's members (`groups.Group.backends`, `endpoints:` or `url:` backends) that a request can take
  is one cluster, `group.A.B` (STATIC; STRICT_DNS with a `url:` member, whose hosts carry its TLS and
  name), whose priorities are the members in that order: priority 0 the
  first attempt's instances, 1 the next member's. A request's first attempt is the policy's
  (`groups.attempt_order`: weights by placement key, held-off or ejected members moved back), chosen
  by the processor when it hands the request over; the later ones follow config order (`first_on`), so
  a group of n members compiles n clusters, config order first. The route's retry policy moves each retry to the next priority (`previous_priorities`), so a
  retry goes to the next member, whoever made the attempt fail: a refused connection (the upstream
  filters never run then: nothing of the processor could pick the next host), a reset, or the
  processor's `x-gateway-retry` on an answer `failover.judge` fails over. 5xx and 429 are not in
  `retry_on`: `judge` alone says which answers are final (a 500 naming a context overflow is).
- The processor is the cluster's upstream filter (role `failover`), once per attempt: it learns the
  member from the attempt's host (`upstream.address`), and runs the request through an ordinary
  exchange for that member, translated when it speaks another API (exchange/failover.py).
- Below it the processor once more (role `hold`, `_holder`): Envoy's router retries no reset once an
  attempt's headers reached it, so an answer's headers are let through only with its first body
  chunk, streamed or not. The fast path's twin (`fast_cluster`, for its compiled retries) asks the
  processor less (`_fast_watch`): Envoy holds a JSON answer whole itself (Lua), the hold runs only for
  a success's stream, a judge (`_judge`) only for an answer of a status it may fail over, and the
  attempt after the last is answered by the processor (`_last_word`), on the cluster's last priority, an
  Envoy-internal listener that always takes the connection (`no_member`); Envoy's router logs each attempt
  (ops/attempt_log.py).
- Within a member Envoy picks the instance round robin. Not a ring hash: Envoy's ring hash (and
  maglev) balancers ignore the retry's priority load, so every retry went back to the first member
  (measured); prefix-cache placement within a member is the price, for grouped models only.
- A member that keeps failing is ejected by Envoy's outlier detection in the `failover:` section's terms
  (`eject_after` consecutive 5xx or refused connections, `eject_seconds` times the ejections, up to
  `max_eject_seconds`); its priority's load spills to the next member until it comes back by itself.
  Envoy keeps that state per cluster, so each order's cluster ejects on the failures it saw; the
  processor's own health (every attempt of every order) is what moves a member back from first place.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, text_format, wrappers_pb2
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import matcher_pb2 as xds_matcher_pb2
from xds.type.matcher.v3 import regex_pb2 as xds_regex_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2

from extproc.config import Backend, Config
from extproc.envoy.names import (
    FAILOVER_ROLE,
    H_BACKEND,
    H_CLUSTER,
    H_FAILOVER,
    H_RETRY,
    HOLD_ROLE,
    JUDGE_ROLE,
)
from extproc.routing.groups import groups
from extproc.routing.hosted import PROTOCOL_OPTIONS, lb_endpoint, tls_socket, upstream_processor

# The CEL attributes the processor reads the attempt's host from (ext_proc `request_attributes`): its
# address, and its endpoint metadata, which names a `url:` member (its addresses are the provider's).
ADDRESS_ATTRIBUTE = "upstream.address"
HOST_METADATA_ATTRIBUTE = "xds.upstream_host_metadata"
# The endpoint metadata of a `url:` member's hosts: its name, which also picks its TLS (transport_socket_matches).
MEMBER_METADATA = "envoy.transport_socket_match"
# The hold's filter name: not ext_proc's own, whose per-route config (a fast route's `disabled`, the
# client-side processor's off switch) Envoy would apply to an upstream filter of that name too (measured).
HOLD_FILTER = "gateway.hold"
MEMBER_KEY = "member"


def _any(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)  # type: ignore[arg-type]
    return out


def carriage(members: tuple[Backend, ...]) -> str:
    """How Envoy carries a group's attempts, in words, for `check-config` and `extproc resolve`."""
    names = ", ".join(group_cluster(first_on(members, b)) for b in members)
    hosted = [b.name for b in members if b.hosted is not None]
    how = f"; {', '.join(hosted)} by DNS, over its own TLS, with its Host and key put on by the processor " \
        "(HTTP/1.1; no fast path)" if hosted else ""
    return f"one cluster per first attempt ({names}), the later attempts in config order{how}"


def shared_instances(members: tuple[Backend, ...]) -> dict[str, list[str]]:
    """Instances two or more members list: an attempt there is taken for the first of them in config
    order (the attempt's member is named by the address Envoy connected to), so the others' key, API
    and health are never used there."""
    listed: dict[str, list[str]] = {}
    for b in members:
        for e in b.endpoints:
            listed.setdefault(e.address, []).append(b.name)
    return {address: names for address, names in listed.items() if len(names) > 1}


def group_cluster(backends: Iterable[Backend]) -> str:
    """The cluster of one list of members (backend names cannot hold a dot's neighbour `+`, so `.` joins)."""
    return "group." + ".".join(b.name for b in backends)


def first_on(backends: tuple[Backend, ...], first: Backend) -> tuple[Backend, ...]:
    """The members as one request's cluster orders them: `first` (the policy's first attempt, by weight,
    hold or the previous turn), then the others in config order. A group of n members needs n clusters,
    not n! (the later attempts' order is config order: docs/configuration.md "How failover is made")."""
    return (first, *(b for b in backends if b is not first))


def member_lists(config: Config) -> list[tuple[Backend, ...]]:
    """Each distinct order of members Envoy carries, in the order the groups first appear: config order
    first (the fast path's, `fast_cluster`), then one order per other first member."""
    out = {first_on(g.backends, b): None for g in groups(config).values() for b in g.backends}
    return list(out)


class Chain(Enum):
    """A group cluster's upstream filters: the processor's attempts (with the hold), or the fast twin's
    (`_fast_watch`: answers held in Envoy, the processor asked only of streams, errors it may fail over
    and the attempt after the last)."""

    ATTEMPTS = "attempts"
    FAST = "fast"


def fast_cluster(backends: Iterable[Backend]) -> str:
    """The same members for the fast path: `fast-group.A.B`, with no attempt's processor (`_fast_watch`)."""
    return "fast-" + group_cluster(backends)


def fast_members(config: Config, cluster: str) -> tuple[Backend, ...]:
    """The members of a fast twin (`fast_cluster`), in its priority order; () for any other cluster."""
    return next((m for m in member_lists(config) if fast_cluster(m) == cluster), ())


def spread(action: rc.RouteAction, members: tuple[Backend, ...]) -> None:
    """A fast route's first attempts shared by the weighted members, as the processor shares them: Envoy
    picks one order's cluster (`first_on`: that member, then config order) per request by weight. At
    random, not by the placement key (a weighted cluster's choice takes no string hash), so on the fast
    path one conversation does not keep its member; no weights: the config order's cluster alone."""
    weighted = [b for b in members if b.weight is not None]
    if weighted:  # (touching the field at all would replace the route's cluster)
        action.weighted_clusters.clusters.extend(
            rc.WeightedCluster.ClusterWeight(name=fast_cluster(first_on(members, b)),
                                             weight=wrappers_pb2.UInt32Value(value=b.weight)) for b in weighted)


def member_on(members: Iterable[Backend], address: str) -> Backend | None:
    """The member one of whose instances is at `address` (the attempt's upstream host), if any."""
    return next((b for b in members if any(e.address == address for e in b.endpoints)), None)


def member_at(config: Config, label: str, address: str) -> str:
    """The backend a fast route's label names: a model group's cluster resolved to the member whose
    instance answered (the access log's upstream address); any other label as it is."""
    for members in member_lists(config):
        if label == group_cluster(members):
            return member.name if (member := member_on(members, address)) is not None else label
    return label


def clusters(config: Config) -> list[cluster_pb2.Cluster]:
    """Each group cluster, and its fast-path twin (unused unless a fast route names it), where the group
    can have one: not with a `url:` member, whose Host and key only the
    processor puts on per attempt."""
    out = []
    for members in member_lists(config):
        out.append(_cluster(config, members, Chain.ATTEMPTS))
        if all(b.hosted is None for b in members):
            out.append(_cluster(config, members, Chain.FAST))
    return out


def fast_retry(config: Config, members: tuple[Backend, ...]) -> rc.RetryPolicy:
    """Envoy alone between the members, on the processor's rule: a reset, a refused connection, or an
    answer the judge (`_judge`) marked `x-gateway-retry` (`failover.judge`: a 5xx, 429 or 408 whose body
    names no final reason); at most `failover.max_attempts` members, and one more attempt, which the
    processor answers at once with the error naming each (`_last_word`: a refused last member too)."""
    retry = _retry(config, min(len(members), config.failover.max_attempts), "retriable-headers,reset,connect-failure")
    # (the judge's mark of a failed-over answer is its status; the answers that end the request carry a
    # mark too, for the attempt log, that is no retry's: `exchange.failover.FastJudge`)
    retry.retriable_headers.append(rc.HeaderMatcher(name=H_RETRY, string_match=string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(regex=r"\d+"))))
    return retry


def _retry(config: Config, retries: int, retry_on: str) -> rc.RetryPolicy:
    """Each retry on the next priority (member), at once; an attempt whose answer has not started within
    `failover.attempt_timeout` is reset and retried too (`reset` covers Envoy's per-try timeout). Envoy
    ignores a per-try timeout once the answer has started towards the client, so it bounds a stream's
    wait for its start, not its length, and a held answer's (a non-streamed one) whole time."""
    return rc.RetryPolicy(
        retry_on=retry_on, num_retries=wrappers_pb2.UInt32Value(value=retries),
        per_try_timeout=duration_pb2.Duration(seconds=config.failover.attempt_timeout),
        retry_priority=rc.RetryPolicy.RetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=_any(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1))),
        retry_back_off=rc.RetryPolicy.RetryBackOff(base_interval=duration_pb2.Duration(nanos=1_000_000),
                                                   max_interval=duration_pb2.Duration(nanos=2_000_000)))


RETRIES_AT_ONCE = 1024  # Envoy's default limit of requests at once on a cluster (its `max_requests`)


def _retries_at_once() -> circuit_breaker_pb2.CircuitBreakers:
    """As many retries at once as requests: each retry on a group cluster is a failover to the next member,
    and Envoy's default (3 at once) would leave the fourth of a burst of failing requests unretried (its
    client given the failed attempt's answer, or the error naming members never tried) just when a member
    goes down."""
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_retries=wrappers_pb2.UInt32Value(value=RETRIES_AT_ONCE))])


def _cluster(config: Config, members: tuple[Backend, ...], chain: Chain) -> cluster_pb2.Cluster:
    name = group_cluster(members) if chain is Chain.ATTEMPTS else fast_cluster(members)

    f = config.failover
    eject = outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=f.eject_after),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=f.eject_after),
        interval=duration_pb2.Duration(seconds=1),
        base_ejection_time=duration_pb2.Duration(seconds=f.eject_seconds),
        max_ejection_time=duration_pb2.Duration(seconds=f.max_eject_seconds),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
        enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=100),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0))
    watch = [upstream_processor(FAILOVER_ROLE, (ADDRESS_ATTRIBUTE, HOST_METADATA_ATTRIBUTE)), _holder(config)] \
        if chain is Chain.ATTEMPTS else _fast_watch(config, members)
    options = hpo.HttpProtocolOptions(http_filters=[
        *watch,
        # Upstream filters change the one header map every attempt is sent from (the processor restores
        # the client's headers before each attempt: exchange/failover.py).
        _http_filter("envoy.filters.http.upstream_codec", upstream_codec_pb2.UpstreamCodec())])
    options.explicit_http_config.http_protocol_options.SetInParent()
    hosted = [b for b in members if b.hosted is not None]
    priorities = [_instances(b) for b in members]
    if chain is Chain.FAST:  # the attempt after the last tried member lands on the sentinel (`no_member`)
        priorities = priorities[:f.max_attempts]
        hosts = sum(map(len, priorities))
        priorities.append([no_member(i) for i in range(hosts + 1)])
        # Envoy counts the sidecar's errors against the sentinel too: with one sentinel host more than the
        # members have, and at most as many hosts out as the members have, one always stays in (measured:
        # a sentinel taken out sent the attempt after the last back to a refused member)
        eject.max_ejection_percent.value = 100 * hosts // (2 * hosts + 1) + 1
    cluster = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STRICT_DNS if hosted else cluster_pb2.Cluster.STATIC,
        dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED, connect_timeout=duration_pb2.Duration(seconds=5),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN, outlier_detection=eject, circuit_breakers=_retries_at_once(),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(priority=i, lb_endpoints=hosts)
            for i, hosts in enumerate(priorities)]))
    cluster.transport_socket_matches.extend(  # each provider's own SNI and name check, on its hosts only
        cluster_pb2.Cluster.TransportSocketMatch(name=b.name, match=_named(b), transport_socket=tls_socket(b.hosted, ("http/1.1",)))
        for b in hosted if b.hosted is not None and b.hosted.scheme == "https")
    cluster.typed_extension_protocol_options[PROTOCOL_OPTIONS].CopyFrom(_any(options))
    return cluster


# The fast twin's last priority: an Envoy-internal listener (deploy/envoy.yaml) that always takes the
# connection, so the attempt after the last tried member (`previous_priorities` moves it there; it would
# start over on the first member, which may refuse too) always gets one and the last-word filter, which
# answers at the request's headers, runs; a request arriving while every member is ejected lands there
# too, and its answer (a 503 the listener gives, the request never forwarded) is judged as no member's.
NO_MEMBER_LISTENER = "gateway.no-member"
NO_MEMBER_HOST = f"envoy://{NO_MEMBER_LISTENER}/"  # how Envoy names its hosts (the upstream log, `upstream.address`)


def no_member(n: int) -> endpoint_components_pb2.LbEndpoint:
    """Sentinel host `n` of a fast group cluster (`NO_MEMBER_LISTENER`; each its own `endpoint_id`)."""
    return endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
        envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name=NO_MEMBER_LISTENER,
                                                                endpoint_id=str(n)))))


def is_no_member(host: str) -> bool:
    """Whether an attempt's host (`upstream.address`, the upstream log's) is a sentinel host."""
    return host.startswith(NO_MEMBER_HOST)


def _holder(config: Config) -> hcm.HttpFilter:
    """The processor once more, below the attempt's own (so it sees the member's answer as it came): it
    answers an answer's response headers only once its first body chunk came (a stream's first event, a
    JSON body's first bytes, often all of it), so the headers reach the router, which retries no reset
    after them (`downstream_response_started_`), only with a body byte behind them. Envoy sends it that
    chunk before its headers are answered (`send_body_without_waiting_for_header_response`); it then
    closes its stream, and Envoy passes the rest on alone. Its wait is ended by the attempt's per-try
    timeout first (a member that sends headers and then nothing is given up on); were the sidecar to
    fail, the answer would pass as it is."""
    mode = processing_mode_pb2.ProcessingMode
    filt, proc = _answer_processor(HOLD_ROLE, HOLD_FILTER, HOLD_ROLE, mode(
        request_header_mode=mode.SKIP, response_header_mode=mode.SEND, response_body_mode=mode.STREAMED),
        timeout=config.failover.attempt_timeout + 5)
    proc.send_body_without_waiting_for_header_response = True
    proc.ClearField("mutation_rules")
    filt.typed_config.Pack(proc)
    return filt


def _answer_processor(role: str, name: str, stat_prefix: str, mode: processing_mode_pb2.ProcessingMode, *,
                      timeout: int | None = None, request: tuple[str, ...] = (),
                      response: tuple[str, ...] = ()) -> tuple[hcm.HttpFilter, ext_proc_pb2.ExternalProcessor]:
    """The processor as one of an attempt's own filters (`role`: the hold, on both paths; the fast path's
    judge and last word): its mode fixed, only the attributes it reads, and, with a `timeout`, passing the
    answer as it is were the sidecar not to answer. The filter and its config, which the caller adjusts
    and packs."""
    filt = upstream_processor(role)
    filt.name = name
    proc = ext_proc_pb2.ExternalProcessor()
    filt.typed_config.Unpack(proc)
    proc.processing_mode.CopyFrom(mode)
    proc.stat_prefix = stat_prefix
    proc.allow_mode_override = False
    if timeout is not None:
        proc.failure_mode_allow = True
        proc.message_timeout.CopyFrom(duration_pb2.Duration(seconds=timeout))
    proc.ClearField("request_attributes")
    proc.request_attributes.extend(request)
    proc.response_attributes.extend(response)
    return filt, proc


# The fast twin's hold of a non-streamed answer, in Envoy itself: the Lua filter stops its headers until
# the body is whole (`body()`), as the processor path holds such a success (a reset before its end is still
# a retry); no processor stream for it. A stream (`text/event-stream`) it lets by: the processor's hold
# (`_holder`) stops only its headers, until its first event. (Lua's `bodyChunks` lets the headers go at
# once: measured.)
WHOLE_LUA = """function envoy_on_response(handle)
  if not string.find(handle:headers():get("content-type") or "", "^text/event%-stream") then handle:body() end
end"""
WHOLE_FILTER = "gateway.whole"
# The statuses `failover.judge` may fail over (5xx, 408, 429); every other answer is final, whatever its body.
JUDGED_STATUS = r"5\d\d|408|429"
# What the fast judge is told with an answer's headers: the member (the cluster and the instance), the
# attempt's number, the request's id (its attempts' records) and its route (the client's API).
JUDGE_ATTRIBUTES = (ADDRESS_ATTRIBUTE, "xds.cluster_name", "xds.route_name", "request.id",
                    "upstream.request_attempt_count")
JUDGE_FILTER = "gateway.judge"
LAST_WORD_FILTER = "gateway.last-word"
_Predicate = xds_matcher_pb2.Matcher.MatcherList.Predicate


def _fast_watch(config: Config, members: tuple[Backend, ...]) -> list[hcm.HttpFilter]:
    """The fast twin's upstream filters: the attempt after the last one answered by the processor
    (`_last_word`, skipped for every other attempt), a non-streamed answer held whole in Envoy
    (`WHOLE_LUA`), a success's stream held until its first event (the processor's hold, skipped for any
    other answer), an answer of a status it may fail over judged by the processor (`_judge`, skipped for
    every other). So the processor sees no attempt whose non-streamed answer succeeds or is final by its
    status."""
    extra = str(min(len(members), config.failover.max_attempts) + 1)
    last = _Predicate(single_predicate=_Predicate.SinglePredicate(
        input=xds_extension_pb2.TypedExtensionConfig(name="attempt", typed_config=_any(
            http_inputs_pb2.HttpRequestHeaderMatchInput(header_name="x-envoy-attempt-count"))),
        value_match=xds_string_pb2.StringMatcher(exact=extra)))
    judged = _response_header(":status", JUDGED_STATUS)
    stream = _Predicate(and_matcher=_Predicate.PredicateList(predicate=[
        _response_header("content-type", "text/event-stream.*"), _Predicate(not_matcher=judged)]))
    return [_run_only(_last_word(), last),
            _http_filter(WHOLE_FILTER, lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=WHOLE_LUA))),
            _run_only(_holder(config), stream), _run_only(_judge(config), judged)]


def _response_header(name: str, regex: str) -> xds_matcher_pb2.Matcher.MatcherList.Predicate:
    return _Predicate(single_predicate=_Predicate.SinglePredicate(
        input=xds_extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(
            http_inputs_pb2.HttpResponseHeaderMatchInput(header_name=name))),
        value_match=xds_string_pb2.StringMatcher(safe_regex=xds_regex_pb2.RegexMatcher(
            google_re2=xds_regex_pb2.RegexMatcher.GoogleRE2(), regex=regex))))


def _run_only(filt: hcm.HttpFilter, when: xds_matcher_pb2.Matcher.MatcherList.Predicate) -> hcm.HttpFilter:
    """`filt` skipped by Envoy for every answer `when` does not match (a match on the response's headers:
    a skipped ext_proc opens no stream, as its request phase sends nothing)."""
    skip = xds_matcher_pb2.Matcher.OnMatch(action=xds_extension_pb2.TypedExtensionConfig(
        name="skip", typed_config=_any(skip_action_pb2.SkipFilter())))
    unless = xds_matcher_pb2.Matcher(matcher_list=xds_matcher_pb2.Matcher.MatcherList(matchers=[
        xds_matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=_Predicate(not_matcher=when), on_match=skip)]))
    return _http_filter(filt.name, extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=unless, extension_config=extension_pb2.TypedExtensionConfig(
            name=filt.name + ".processor", typed_config=filt.typed_config)))


def _last_word() -> hcm.HttpFilter:
    """The processor on the attempt after the last (Envoy makes it when the last member got no answer:
    refused, reset, silent): it answers at once, at the request's headers, with the error naming every
    attempt (`exchange.failover.FastJudge`), so a refused last member is named too, not Envoy's bare 503:
    that attempt always gets a connection, to the sentinel (`NO_MEMBER_LISTENER`), where upstream filters
    run (a refused connection would end it before the processor's answer)."""
    mode = processing_mode_pb2.ProcessingMode
    filt, proc = _answer_processor(JUDGE_ROLE, LAST_WORD_FILTER, "last_word", mode(
        request_header_mode=mode.SEND, response_header_mode=mode.SKIP), request=JUDGE_ATTRIBUTES)
    filt.typed_config.Pack(proc)
    return filt


def _judge(config: Config) -> hcm.HttpFilter:
    """The processor on a fast-path attempt's answer of a status it may fail over (`JUDGED_STATUS`): the
    body is read whole (BUFFERED) and judged as on the processor path (`exchange.failover.FastJudge`),
    which marks a failed-over answer `x-gateway-retry` for Envoy's retry, and answers the last one with
    the error naming each attempt. Were the sidecar not to answer, the answer would go on as it is
    (`failure_mode_allow`)."""
    mode = processing_mode_pb2.ProcessingMode
    filt, proc = _answer_processor(JUDGE_ROLE, JUDGE_FILTER, JUDGE_ROLE, mode(
        request_header_mode=mode.SKIP, response_header_mode=mode.SEND, response_body_mode=mode.BUFFERED),
        timeout=5, response=JUDGE_ATTRIBUTES)
    filt.typed_config.Pack(proc)
    return filt


def named_member(metadata: str) -> str:
    """The member an attempt's host metadata names (`HOST_METADATA_ATTRIBUTE`: a `url:` member's hosts
    carry it), or "". Envoy sends a message-valued attribute as its protobuf text (measured: "" or "NULL"
    for a host without metadata), so it is read back as the message it is."""
    if MEMBER_METADATA not in metadata:
        return ""
    named = text_format.Parse(metadata, base_pb2.Metadata()).filter_metadata.get(MEMBER_METADATA)
    value = named.fields.get(MEMBER_KEY) if named is not None else None
    return value.string_value if value is not None else ""


def _named(backend: Backend) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({MEMBER_KEY: backend.name})
    return out


def _instances(backend: Backend) -> list[endpoint_components_pb2.LbEndpoint]:
    """A member's hosts in its priority: its instances, or a provider's name, resolved by the cluster
    (STRICT_DNS: each address one host), marked with the member's name (its TLS, and the attempt's member)."""
    if backend.hosted is None:
        return [lb_endpoint(e.address, e.weight) for e in backend.endpoints]
    host = lb_endpoint(f"{backend.hosted.host}:{backend.hosted.port}", 1)
    host.metadata.filter_metadata[MEMBER_METADATA].CopyFrom(_named(backend))
    return [host]


def _http_filter(name: str, config: object) -> hcm.HttpFilter:
    return hcm.HttpFilter(name=name, typed_config=_any(config))


def routes(config: Config) -> list[rc.Route]:
    """One route per group cluster, taken by the processor's mark and cluster header: Envoy's retries
    between the members, at most `failover.max_attempts` of them, with no back-off worth the name (the
    next member is another backend: nothing to wait for) and one more attempt than the members tried,
    which the processor answers with the error naming each; when that attempt finds no processor (it
    goes back to the first member, which may refuse too), the client-side exchange replaces Envoy's
    reply with the same error (`exchange.failover.HandedOver`)."""
    out = []
    f = config.failover
    for members in member_lists(config):
        cluster = group_cluster(members)
        retry = _retry(config, min(len(members), f.max_attempts), "retriable-headers,reset,connect-failure")
        retry.retriable_headers.append(rc.HeaderMatcher(name=H_RETRY, present_match=True))
        route_action = rc.RouteAction(
            cluster=cluster, timeout=duration_pb2.Duration(seconds=0),
            idle_timeout=duration_pb2.Duration(seconds=config.limits.upstream_timeout_seconds), retry_policy=retry)
        out.append(rc.Route(name=f"processor:{cluster}", route=route_action, request_headers_to_remove=[H_BACKEND, H_CLUSTER],
                            match=rc.RouteMatch(prefix="/", headers=[
            rc.HeaderMatcher(name=H_CLUSTER, string_match=string_pb2.StringMatcher(exact=cluster)),
            rc.HeaderMatcher(name=H_FAILOVER, present_match=True)])))
    return out


