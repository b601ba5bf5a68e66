"""Failover on the fast path, sans-IO: the compiled fast twin (its filters, its retry), the judge of an
attempt's error answer (`FastJudge`), and Envoy's router log of each attempt read back (`attempt_log`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import yaml
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from extproc.config import parse_config
from extproc.exchange.failover import FastJudge, fast_attempt_key
from extproc.ops.attempt_log import attempt_of, record
from extproc.ops.metrics import Metrics
from extproc.routing import group_routes
from extproc.routing.failover import Health
from extproc.routing.gateway import Gateway
from extproc.state.lookup import Lookup

CFG = """
failover: {max_attempts: 3, eject_after: 2}
backends:
  - {name: a, api: chat, models: ["m"], endpoints: ["10.0.0.1:8000"]}
  - {name: b, api: chat, models: ["m"], endpoints: ["10.0.0.2:8000", "10.0.0.3:8000"]}
  - {name: c, api: chat, models: ["m"], endpoints: ["10.0.0.4:8000"]}
"""
CLUSTER = "fast-group.a.b.c"


def gateway() -> Gateway:
    return Gateway(parse_config(CFG), tenant_secret=b"s" * 32)


def resolve(step, store: dict[str, bytes]):
    while isinstance(step, Lookup):
        step = step.then([store.get(k) for k in step.keys])
    store.update({k: v for k, v in step.writes if v is not None})
    return step


def _filters(name: str) -> list:
    (cluster,) = [c for c in group_routes.clusters(gateway().config) if c.name == name]
    options = hpo.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    return list(options.http_filters)


def test_the_fast_twin_holds_in_envoy_and_asks_the_processor_only_of_streams_and_judged_statuses():
    last_word, whole, hold, judge, codec = _filters(CLUSTER)
    assert codec.name == "envoy.filters.http.upstream_codec"
    lua = lua_pb2.Lua()
    whole.typed_config.Unpack(lua)
    assert "handle:body()" in lua.default_source_code.inline_string  # a JSON answer whole, in Envoy
    wrapped = {}
    for f in (last_word, hold, judge):
        ext = extension_matcher_pb2.ExtensionWithMatcher()
        f.typed_config.Unpack(ext)
        proc = ext_proc_pb2.ExternalProcessor()
        ext.extension_config.typed_config.Unpack(proc)
        wrapped[f.name] = (ext, proc)
        # skipped (SkipFilter) unless its predicate holds: nothing is sent at the request
        (rule,) = ext.xds_matcher.matcher_list.matchers
        assert rule.on_match.action.name == "skip" and rule.predicate.HasField("not_matcher")
    for name in (group_routes.HOLD_FILTER, group_routes.JUDGE_FILTER):
        proc = wrapped[name][1]
        assert proc.processing_mode.request_header_mode == processing_mode_pb2.ProcessingMode.SKIP
        assert proc.failure_mode_allow
    # the attempt after the last (three members, at most three attempts): the processor at its request
    ext, proc = wrapped[group_routes.LAST_WORD_FILTER]
    attempt = ext.xds_matcher.matcher_list.matchers[0].predicate.not_matcher.single_predicate
    assert attempt.value_match.exact == "4"
    assert proc.processing_mode.request_header_mode == processing_mode_pb2.ProcessingMode.SEND
    _, judge_proc = wrapped[group_routes.JUDGE_FILTER]
    assert [m.value for m in judge_proc.grpc_service.initial_metadata] == ["judge"]
    assert judge_proc.processing_mode.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    judged = wrapped[group_routes.JUDGE_FILTER][0].xds_matcher.matcher_list.matchers[0].predicate.not_matcher
    assert judged.single_predicate.value_match.safe_regex.regex == r"5\d\d|408|429"
    _, hold_proc = wrapped[group_routes.HOLD_FILTER]
    assert [m.value for m in hold_proc.grpc_service.initial_metadata] == ["hold"]
    stream = wrapped[group_routes.HOLD_FILTER][0].xds_matcher.matcher_list.matchers[0].predicate.not_matcher
    ct, not_judged = stream.and_matcher.predicate
    assert ct.single_predicate.value_match.safe_regex.regex.startswith("text/event-stream")
    assert not_judged.not_matcher.single_predicate.value_match.safe_regex.regex == r"5\d\d|408|429"


def test_the_fast_retry_follows_the_judges_mark_not_every_5xx():
    gw = gateway()
    retry = group_routes.fast_retry(gw.config, gw.config.backends)
    assert retry.retry_on == "retriable-headers,reset,connect-failure" and not retry.retriable_status_codes
    (mark,) = retry.retriable_headers
    assert mark.name == "x-gateway-retry" and mark.string_match.safe_regex.regex == r"\d+"  # a status: retried
    assert retry.num_retries.value == 3  # each member, and the attempt after the last


def _judge(gw: Gateway, store: dict[str, bytes], n: int, address: str, status: int, body: dict,
           headers: dict[str, str] | None = None, rid: str = "req-1", route: str = "fast:chat:group.a.b.c"):
    j = FastJudge(gw)
    j.attributes = {"xds.cluster_name": CLUSTER, "upstream.address": address, "request.id": rid,
                    "upstream.request_attempt_count": str(n), "xds.route_name": route}
    first = resolve(j.response_headers({":status": str(status), "content-type": "application/json", **(headers or {})}),
                    store)
    assert not first.done and not first.set_headers  # the body comes whole, judged with it
    return resolve(j.response_body(json.dumps(body).encode(), True), store)


def _error(message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def test_a_failed_over_answer_is_recorded_and_marked_and_a_final_one_goes_on():
    gw, store = gateway(), {}
    act = _judge(gw, store, 1, "10.0.0.1:8000", 503, _error("overloaded"))
    assert act.done and act.body is None and ("x-gateway-retry", "503") in act.set_headers
    said = orjson.loads(store[fast_attempt_key("req-1", 1)])
    assert (said["backend"], said["status"], said["message"]) == ("a", 503, "overloaded")
    # a 500 naming a context overflow: every member would say it; as it is, unmarked, nothing recorded
    final = _judge(gw, store, 1, "10.0.0.1:8000", 500, _error("maximum context length is 8192 tokens"), rid="req-2")
    assert final.done and final.body is None and final.set_headers == []
    assert fast_attempt_key("req-2", 1) not in store


def test_the_last_attempt_answers_the_error_naming_each_in_the_clients_shape():
    gw, store = gateway(), {}
    _judge(gw, store, 1, "10.0.0.1:8000", 503, _error("overloaded"))
    # attempt 2 got no answer (refused, reset): nobody recorded it; attempt 3, on c, fails too
    last = _judge(gw, store, 3, "10.0.0.4:8000", 500, _error("crashed"), route="fast:responses:group.a.b.c")
    sets = dict(last.set_headers)
    assert sets[":status"] == "502" and sets["x-gateway-retry"] == "last 500"  # the attempt log reads it
    body = json.loads(last.body)
    assert body["error"]["code"] == "all_backends_failed" and sets["content-length"] == str(len(last.body))
    message = body["error"]["message"]
    assert message.index("a: 503 overloaded") < message.index("b: no answer") < message.index("c: 500 crashed")


def test_the_sentinels_answer_is_no_members_the_error_names_the_members_envoy_had_ejected():
    """Every member not yet tried is ejected: Envoy sends the attempt to the sentinel, whose 503 is replaced
    by the error naming each member, in the client's shape (a Messages client here)."""
    gw, store = gateway(), {}
    everyone_out = _judge(gw, store, 1, "envoy://gateway.no-member/", 503, _error("no member of this model group is in"),
                          route="fast:messages:group.a.b.c")
    sets = dict(everyone_out.set_headers)
    body = json.loads(everyone_out.body)
    assert sets[":status"] == "502" and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert body["error"]["message"] == ("every backend of this model failed (3 attempts): a: taken out (ejected after "
                                        "failing); b: taken out (ejected after failing); c: taken out (ejected after failing)")
    # a tried first and failed; b and c were out: attempt 2 went to the sentinel
    _judge(gw, store, 1, "10.0.0.1:8000", 503, _error("overloaded"), rid="req-2")
    later = _judge(gw, store, 2, "envoy://gateway.no-member/", 503, _error("no member"), rid="req-2")
    message = json.loads(later.body)["error"]["message"]
    assert message.startswith("every backend of this model failed (3 attempts): a: 503 overloaded; b: taken out")


def test_the_fast_twin_ends_on_the_sentinel_after_the_members_it_may_try():
    """At most max_attempts members: the attempt after them lands on the sentinel, never on a member."""
    config = parse_config(CFG.replace("max_attempts: 3", "max_attempts: 2"))
    (fast,) = [c for c in group_routes.clusters(config) if c.name == CLUSTER]
    assert [(p.priority, [e.endpoint.address.socket_address.address or
                          e.endpoint.address.envoy_internal_address.server_listener_name for e in p.lb_endpoints])
            for p in fast.load_assignment.endpoints] == \
        [(0, ["10.0.0.1"]), (1, ["10.0.0.2", "10.0.0.3"]), (2, ["gateway.no-member"] * 4)]
    # one sentinel host more than the members have (each its own endpoint id), and at most as many out
    # as the members have: 3 of 7 hosts is 42.9%, 4 would be 57.1%
    assert [e.endpoint.address.envoy_internal_address.endpoint_id for e in fast.load_assignment.endpoints[2].lb_endpoints] \
        == ["0", "1", "2", "3"]
    assert fast.outlier_detection.max_ejection_percent.value == 43
    (processor,) = [c for c in group_routes.clusters(config) if c.name == "group.a.b.c"]
    assert len(processor.load_assignment.endpoints) == 3  # the processor's attempts keep every member


def test_the_shipped_envoy_has_the_sentinel_listener():
    envoy = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "envoy.yaml").read_text())
    assert "envoy.bootstrap.internal_listener" in [e["name"] for e in envoy["bootstrap_extensions"]]
    (listener,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == group_routes.NO_MEMBER_LISTENER]
    assert listener["internal_listener"] == {} and "address" not in listener
    assert group_routes.is_no_member("envoy://gateway.no-member/3") and not group_routes.is_no_member("10.0.0.1:8000")


def test_the_attempt_after_the_last_is_answered_at_once_with_the_error_naming_each():
    gw, store = gateway(), {}
    _judge(gw, store, 1, "10.0.0.1:8000", 503, _error("overloaded"))
    _judge(gw, store, 2, "10.0.0.2:8000", 503, _error("busy"))  # attempt 3, on c, was refused: no record
    j = FastJudge(gw)
    j.attributes = {"xds.cluster_name": CLUSTER, "request.id": "req-1", "xds.route_name": "fast:chat:group.a.b.c"}
    act = resolve(j.request_headers({":path": "/v1/chat/completions", "x-envoy-attempt-count": "4"}, True), store)
    status, body, ctype = act.immediate
    assert (status, ctype, act.done) == (502, "application/json", True)
    assert act.set_headers == []  # no retry mark (Envoy's retry never sees the sidecar's own reply)
    message = json.loads(body)["error"]["message"]
    assert message.index("a: 503 overloaded") < message.index("b: 503 busy") < message.index("c: no answer")


def test_every_attempt_rate_limited_is_a_429_with_the_soonest_retry_after():
    gw, store = gateway(), {}
    _judge(gw, store, 1, "10.0.0.1:8000", 429, _error("slow down"), {"retry-after": "9"})
    _judge(gw, store, 2, "10.0.0.3:8000", 429, _error("slow down"), {"retry-after": "4"})
    last = _judge(gw, store, 3, "10.0.0.4:8000", 429, _error("slow down"), {"retry-after": "6"})
    sets = dict(last.set_headers)
    assert sets[":status"] == "429" and sets["retry-after"] == "4"


def _entry(**fields: str) -> dict[str, str]:
    return {"cluster": CLUSTER, **fields}


def test_each_logged_attempt_is_the_attempt_the_processor_would_have_recorded():
    config = gateway().config
    cases = {  # what Envoy logged -> (backend, outcome)
        "ok": (_entry(host="10.0.0.3:8000", status="200", flags="-"), ("b", "ok")),
        "final error": (_entry(host="10.0.0.1:8000", status="500"), ("a", "rejected")),
        "judged": (_entry(host="10.0.0.1:8000", status="503", retried="503"), ("a", "failed")),
        "rate limited": (_entry(host="10.0.0.1:8000", status="429", retried="429", **{"retry-after": "5"}),
                         ("a", "rate_limited")),
        "replaced by the error naming each": (_entry(host="10.0.0.4:8000", status="502", retried="last 504"),
                                              ("c", "timeout")),
        "refused": (_entry(host="10.0.0.4:8000", status="0", flags="UF,URX"), ("c", "connect_failure")),
        "per-try timeout": (_entry(host="10.0.0.4:8000", status="0", flags="UT"), ("c", "timeout")),
        "reset": (_entry(host="10.0.0.4:8000", status="0", flags="UPE"), ("c", "reset")),
    }
    for name, (fields, expected) in cases.items():
        attempt = attempt_of(config, fields)
        assert attempt is not None and (attempt.backend, attempt.outcome) == expected, name
    assert attempt_of(config, _entry(host="10.0.0.1:8000", status="429", retried="429", **{"retry-after": "5"})
                      ).retry_after == 5
    # the client gone, another cluster, an instance no member lists: nothing the members did
    assert attempt_of(config, _entry(host="10.0.0.1:8000", status="0", flags="DC")) is None
    # the attempt after the last, on the sentinel (the sidecar answered it at its headers): as Envoy logs it
    assert attempt_of(config, _entry(host="envoy://gateway.no-member/", status="0")) is None
    assert attempt_of(config, {"cluster": "group.a.b.c", "host": "10.0.0.1:8000", "status": "200"}) is None
    assert attempt_of(config, _entry(host="10.9.9.9:8000", status="200")) is None


def test_a_batch_is_counted_and_told_to_health():
    config = gateway().config
    metrics, health = Metrics(), Health(config.failover)
    request = logs_service_pb2.ExportLogsServiceRequest()
    logs = request.resource_logs.add().instrumentation_library_logs.add().logs
    for host, status, mark in (("10.0.0.1:8000", "503", "503"), ("10.0.0.1:8000", "503", "503"),
                               ("10.0.0.2:8000", "200", "-")):
        entry = logs.add()
        for key, value in (("cluster", CLUSTER), ("host", host), ("status", status), ("retried", mark)):
            kv = entry.attributes.add(key=key)
            kv.value.string_value = value
    assert record(metrics, config, health, request) == 3
    assert metrics.upstream_attempts.values[("a", "failed")] == 2 and metrics.upstream_attempts.values[("b", "ok")] == 1
    now = time.monotonic()  # the clock Health reads (`eject_after: 2`)
    assert health.state("a", now) == "ejected" and health.state("b", now) == "healthy"


def test_every_group_cluster_takes_as_many_retries_at_once_as_requests():
    """Envoy's default of 3 retries at once would leave a burst's fourth failing request unretried."""
    config = gateway().config
    limits = {c.name: [t.max_retries.value for t in c.circuit_breakers.thresholds]
              for c in group_routes.clusters(config)}
    assert limits and all(v == [1024] for v in limits.values()), limits
