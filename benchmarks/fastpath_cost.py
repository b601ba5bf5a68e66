"""What each piece of the fast path costs Envoy: CPU time per request, one variant at a time.

Throughput ratios on a shared machine are noise; CPU seconds per request are not (much). This starts
nginx (the canned upstream), the sidecar (for the access-log service only), Envoy alone, and one Envoy
per variant of deploy/envoy.yaml, each with the routes the sidecar compiles for the benchmark's config
written into the file (static, so a variant may change them too), then loads them interleaved
(Envoy alone before each variant, the variants in a new random order each round) with wrk and reads each Envoy's and the sidecar's
user+system CPU from /proc before and after each run.

    .venv/bin/python benchmarks/fastpath_cost.py [--rounds 5] [--duration 3] [--connections 8] [--only full,-als]
        [--before-src OTHER_CHECKOUT] [--callgrind 300]

Variants: `full` (the shipped file), `minimal` (the Envoy-only experiment: json_to_metadata and metadata
routes), `+NAME` (minimal with one addition back), `-NAME` (full without it), and other forms of one
piece (`als-metadata-filter`, `header-mutation-early`, `model-twice-empty`, ...; see VARIANTS).

Prints, per variant: Envoy's CPU per request (µs, median over the rounds, and quartiles), the same over
Envoy alone's run just before it (`cpu x alone`: both move with the machine's load, so their ratio
holds best), the sidecar's CPU per request, the throughput ratio against Envoy alone, and the median
latency added (ms). With `--callgrind N`: Envoy's instructions per request over N requests one after
another, each variant on one worker under valgrind's callgrind in turn (deterministic to about 2 %,
where the CPU columns move with the machine's load by as much as one piece costs; blind to locks and
caches). `--before-src DIR`: the variant `before` is DIR's deploy/envoy.yaml logging to DIR's own sidecar.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from common import (
    REPO,
    Stack,
    _hcm,
    envoy_alone_config,
    free_port,
    run,
    spawn_checkout,
    start_nginx,
    wait_for_envoy,
    wait_for_port,
)

from extproc.local.stack import find_envoy, render_envoy_config

CHAT = ("/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]})
RESP = ("/v1/responses", {"model": "bench-r", "input": "Say something short.", "store": False})
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wrk(url: str, body: dict, headers: dict[str, str], duration: int, connections: int) -> tuple[int, float, float]:
    """(requests, requests per second, median latency ms)."""
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"wrk-cost-{os.getpid()}.lua"
    lua_headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in {"content-type": "application/json", **headers}.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{json.dumps(body)}]]\n{lua_headers}')
    out = run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]).stdout
    script.unlink()
    if (bad := re.search(r"Non-2xx or 3xx responses: (\d+)", out)):
        raise RuntimeError(f"{url}: {bad.group(1)} failed requests\n{out}")
    n = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    return n, rps, float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]


# -- variants: each a change to the gateway's Envoy config ---------------------------------------

Doc = dict[str, Any]


def filters(doc: Doc) -> list[Doc]:
    return _hcm(doc)["http_filters"]


def drop_filter(name: str) -> Callable[[Doc], None]:
    def go(doc: Doc) -> None:
        hcm = _hcm(doc)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != name]
    return go


def als(doc: Doc) -> Doc:
    return next(a for a in _hcm(doc)["access_log"] if a["name"] == "envoy.access_loggers.http_grpc")


def no_als(doc: Doc) -> None:
    _hcm(doc)["access_log"] = []


def als_unbatched(doc: Doc) -> None:
    """Envoy's default batch (16 KiB) instead of the config's 256 KiB."""
    als(doc)["typed_config"]["common_config"].pop("buffer_size_bytes")


def json_meta(doc: Doc) -> Doc:
    return next(f for f in filters(doc) if f["name"] == "envoy.filters.http.match_delegate")["typed_config"][
        "extension_config"]["typed_config"]


def no_response_rules(doc: Doc) -> None:
    json_meta(doc).pop("response_rules")


def routes(doc: Doc) -> list[Doc]:
    return _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]


def no_per_route(doc: Doc) -> None:
    """No ext_proc filter at all, so no per-route config either (the fast routes need neither)."""
    drop_filter(EXT_PROC)(doc)
    host = _hcm(doc)["route_config"]["virtual_hosts"][0]
    host.pop("typed_per_filter_config", None)
    for r in host["routes"]:
        r.pop("typed_per_filter_config", None)


def ext_proc_not_created(doc: Doc) -> None:
    """Fast routes turn ext_proc off with FilterConfig.disabled, so Envoy does not even create the filter
    (ExtProcPerRoute.disabled: created, then it reads its route's config and steps aside)."""
    for r in routes(doc):
        if r["name"].startswith("fast:"):
            r["typed_per_filter_config"][EXT_PROC] = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                                      "disabled": True}


def disable(*names: str) -> Callable[[Doc], None]:
    """Listed with disabled: true (a virtual host or route would have to turn them on)."""
    def go(doc: Doc) -> None:
        for f in filters(doc):
            if f["name"] in names:
                f["disabled"] = True
    return go


def no_route_header_removal(doc: Doc) -> None:
    for r in routes(doc):
        r.pop("request_headers_to_remove", None)


EXT_PROC = "envoy.filters.http.ext_proc"
LUA = ("envoy.filters.http.lua.clients", "envoy.filters.http.lua.client_models")
MODEL_TWICE = "envoy.filters.http.lua.model_twice"
SSE = "envoy.filters.http.sse_to_metadata"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
REQUEST_MODEL = "envoy.filters.http.match_delegate.request_model"
HEADER_TO_METADATA = "envoy.filters.http.header_to_metadata"


def restore_filters(*names: str) -> Callable[[Doc, Doc], None]:
    """Put these filters back where the full config has them."""
    def go(doc: Doc, full: Doc) -> None:
        keep = {f["name"] for f in filters(doc)} | set(names)
        _hcm(doc)["http_filters"] = [f for f in filters(full) if f["name"] in keep]
    return go


def minimal(doc: Doc) -> None:
    """The Envoy-only experiment: json_to_metadata (request rules) and metadata routes, nothing else."""
    no_als(doc)
    no_response_rules(doc)
    no_per_route(doc)
    no_route_header_removal(doc)
    keep = {"envoy.filters.http.match_delegate", "envoy.filters.http.router"}
    _hcm(doc)["http_filters"] = [f for f in filters(doc) if f["name"] in keep]


def plus(*names: str) -> Callable[[Doc], None]:
    """`minimal` with these additions back."""
    def go(doc: Doc) -> None:
        full = copy.deepcopy(doc)
        minimal(doc)
        for name in names:
            ADDITIONS[name](doc, full)
    return go


def _response_rules(doc: Doc, full: Doc) -> None:
    json_meta(doc)["response_rules"] = json_meta(full)["response_rules"]


def _als(doc: Doc, full: Doc) -> None:
    _hcm(doc)["access_log"] = _hcm(full)["access_log"]


def _ext_proc(doc: Doc, full: Doc) -> None:
    restore_filters(EXT_PROC)(doc, full)
    doc_host, full_host = (_hcm(d)["route_config"]["virtual_hosts"][0] for d in (doc, full))
    doc_host["typed_per_filter_config"] = full_host["typed_per_filter_config"]
    for r, f in zip(doc_host["routes"], full_host["routes"], strict=True):
        if "typed_per_filter_config" in f:
            r["typed_per_filter_config"] = f["typed_per_filter_config"]


def _route_header_removal(doc: Doc, full: Doc) -> None:
    for r, f in zip(routes(doc), routes(full), strict=True):
        if "request_headers_to_remove" in f:
            r["request_headers_to_remove"] = f["request_headers_to_remove"]


# What the fast path adds to the Envoy-only experiment, each a way to put it back into `minimal`.
ADDITIONS: dict[str, Callable[[Doc, Doc], None]] = {
    "response-rules": _response_rules,
    "als": _als,
    "ext-proc": _ext_proc,
    "route-header-removal": _route_header_removal,
    "sse": restore_filters(SSE),
    "lua": restore_filters(*LUA),
    "model-twice": restore_filters(MODEL_TWICE),
    "header-mutation": restore_filters(HEADER_MUTATION),
    "request-model": restore_filters(REQUEST_MODEL),
    "header-to-metadata": restore_filters(HEADER_TO_METADATA),
    "ratelimit": restore_filters("envoy.filters.http.ratelimit"),
}

# The same additions taken out of the full config one at a time (`-NAME`): what each costs where the
# others are all there (the clients' Lua and the rate limit are disabled in the file; nothing to take out).
REMOVALS: dict[str, Callable[[Doc], None]] = {
    "response-rules": no_response_rules,
    "als": no_als,
    "ext-proc": no_per_route,
    "route-header-removal": no_route_header_removal,
    "sse": drop_filter(SSE),
    "model-twice": drop_filter(MODEL_TWICE),
    "header-mutation": drop_filter(HEADER_MUTATION),
    "request-model": drop_filter(REQUEST_MODEL),
    "header-to-metadata": drop_filter(HEADER_TO_METADATA),
}


def als_batch(size: int, interval: str) -> Callable[[Doc], None]:
    """Larger batches: fewer messages for Envoy to write and the sidecar to read, usage counted later."""
    def go(doc: Doc) -> None:
        als(doc)["typed_config"]["common_config"].update(buffer_size_bytes=size, buffer_flush_interval=interval)
    return go


def als_as_stats(doc: Doc) -> None:
    """Not a replacement (the sidecar's metrics and the tenants' token limits read the entries): what
    counting the same entries in Envoy's own counters (the stats access logger) would cost instead."""
    tags = [{"name": "route", "value_format": "%ROUTE_NAME%"},
            {"name": "model", "value_format": "%DYNAMIC_METADATA(llm_gateway:model)%"},
            {"name": "status", "value_format": "%RESPONSE_CODE%"}]
    counter = {"stat": {"name": "requests", "tags": tags}, "value_fixed": 1}
    tokens = [{"stat": {"name": f"{k}_tokens", "tags": tags}, "value_format": f"%DYNAMIC_METADATA(llm_gateway:{k}_tokens)%"}
              for k in ("input", "output")]
    grpc = als(doc)
    _hcm(doc)["access_log"] = [{"name": "envoy.access_loggers.stats", "filter": grpc["filter"], "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config", "stat_prefix": "usage",
        "counters": [counter, *tokens]}}]


# What replacing the access-log service by Envoy's stats would take, whole: every series the service
# feeds (ops/access_log.py: requests by API, backend, model and outcome; tokens by kind; the GenAI
# duration and token histograms; the listed tenants' requests and tokens), each a stat of the stats access
# logger tagged with what its label needs, and the OpenTelemetry stat sink sending them (and nothing
# else) to the sidecar every second. Token values the answer may lack are read through CEL, 0 when
# absent, so the logger has a number for every entry.
USAGE_TAGS = {"route": "%ROUTE_NAME%", "client_api": "%DYNAMIC_METADATA(llm_gateway:client_api)%",
              "backend": "%DYNAMIC_METADATA(llm_gateway:backend)%", "model": "%DYNAMIC_METADATA(llm_gateway:model)%",
              "upstream": "%UPSTREAM_HOST%"}
TOKEN_KEYS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cache_creation_tokens")


def _token(key: str) -> str:
    m = "metadata.filter_metadata"
    return f"%CEL(('llm_gateway' in {m} && '{key}' in {m}.llm_gateway) ? {m}.llm_gateway.{key} : 0)%"


def stats_usage(one_tag: bool, histograms: bool = True, tenants: bool = True) -> Callable[[Doc], None]:
    """`one_tag`: the labels joined into one tag (one formatter and one tag name per stat, not five)."""
    def tags(*extra: tuple[str, str]) -> list[Doc]:
        pairs = [*USAGE_TAGS.items(), *extra]
        if one_tag:
            return [{"name": "k", "value_format": "|".join(v for _, v in pairs)}]
        return [{"name": n, "value_format": v} for n, v in pairs]

    def go(doc: Doc) -> None:
        status = ("status", "%RESPONSE_CODE%")
        counters = [{"stat": {"name": "requests", "tags": tags(status)}, "value_fixed": 1},
                    *({"stat": {"name": key, "tags": tags()}, "value_format": _token(key)} for key in TOKEN_KEYS)]
        if tenants:
            tenant = [{"name": "tenant", "value_format": "%DYNAMIC_METADATA(llm_gateway:tenant)%"}]
            counters += [{"stat": {"name": "tenant_requests", "tags": tenant}, "value_fixed": 1},
                         *({"stat": {"name": f"tenant_{key}", "tags": tenant}, "value_format": _token(key)}
                           for key in TOKEN_KEYS[:2])]
        config: Doc = {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config",
                       "stat_prefix": "usage", "counters": counters}
        if histograms:
            config["histograms"] = [
                {"stat": {"name": "duration", "tags": tags(status)}, "unit": "Milliseconds",
                 "value_format": "%DURATION%"},
                *({"stat": {"name": f"{key}_usage", "tags": tags()}, "value_format": _token(key)}
                  for key in TOKEN_KEYS[:2])]
        grpc = als(doc)
        _hcm(doc)["access_log"] = [{"name": "envoy.access_loggers.stats", "filter": grpc["filter"],
                                    "typed_config": config}]
        doc["stats_flush_interval"] = "1s"
        doc["stats_sinks"] = [{"name": "envoy.stat_sinks.open_telemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}},
            "report_counters_as_deltas": True, "report_histograms_as_deltas": True,
            # only the usage stats go to the sidecar
            "custom_metric_conversions": {
                "matcher_list": {"matchers": [{
                    "predicate": {"single_predicate": {
                        "input": {"name": "stat_full_name", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.stats.v3.StatFullNameMatchInput"}},
                        "value_match": {"prefix": "usage."}}},
                    "on_match": {"action": {"name": "keep", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig.ConversionAction"}}}}]},
                "on_no_match": {"action": {"name": "drop", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig.DropAction"}}}}}}]
    return go


# The same entries as OpenTelemetry log records whose body is one line of just what the service reads,
# the model last (the one value a client chose), instead of Envoy's whole HTTP entry (addresses,
# timings, headers, every metadata namespace as a Struct). Envoy's side only: the sidecar serves no
# OTLP logs (a branch that did measured the same sidecar CPU; benchmarks/README.md).
OTEL_LINE = "\x1f".join(("%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
                         *(f"%DYNAMIC_METADATA(llm_gateway:{k})%" for k in TOKEN_KEYS),
                         "%ROUTE_NAME%", "%RESPONSE_CODE%", "%UPSTREAM_HOST%",
                         *(f"%DYNAMIC_METADATA(llm_gateway:{k})%" for k in ("client_api", "backend", "envoy_counts",
                                                                           "tenant", "model"))))


def als_otel(doc: Doc) -> None:
    grpc = als(doc)
    common = grpc["typed_config"]["common_config"]
    grpc.update(name="envoy.access_loggers.open_telemetry", typed_config={
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
        "common_config": common, "disable_builtin_labels": True, "body": {"string_value": OTEL_LINE}})


def response_rules_two(doc: Doc) -> None:
    """The JSON answers' usage read by two rules (chat's input and output tokens) instead of all of them:
    whether the response rules cost per rule or per answer parsed."""
    rules = json_meta(doc)["response_rules"]
    rules["rules"] = rules["rules"][:2]


def als_route_cel(doc: Doc) -> None:
    """The CEL filter's first clause alone (the fast routes' entries; what the second one costs)."""
    als(doc)["filter"]["extension_filter"]["typed_config"]["expression"] = "xds.route_name.startsWith('fast:')"


def als_metadata_filter(doc: Doc) -> None:
    """The same entries chosen by two metadata filters instead of CEL: no `client_api` (the processor never
    answered: a fast route, or Envoy's own reply, which the service ignores) or the `envoy_counts` mark."""
    def present(key: str, **kw: Any) -> Doc:
        return {"metadata_filter": {"matcher": {"filter": "llm_gateway", "path": [{"key": key}],
                                                "value": {"present_match": True}, **kw}}}
    counts = present("envoy_counts")
    counts["metadata_filter"]["match_if_key_not_found"] = False
    als(doc)["filter"] = {"or_filter": {"filters": [present("client_api", invert=True), counts]}}


def header_mutation(doc: Doc) -> Doc:
    return next(f for f in filters(doc) if f["name"] == HEADER_MUTATION)["typed_config"]


def header_mutation_early(doc: Doc) -> None:
    """The request mutations as the connection manager's early header mutation (before routing, as the
    filter's first place has them), the filter left with the response mutations."""
    mutations = header_mutation(doc)["mutations"]
    _hcm(doc)["early_header_mutation_extensions"] = [{
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation"
                                  ".v3.HeaderMutation", "mutations": mutations.pop("request_mutations")}}]


def header_mutation_no_path(doc: Doc) -> None:
    """Without the x-envoy-original-path copy (the access log's and the rate limit's path): its formatter's
    cost."""
    mutations = header_mutation(doc)["mutations"]
    mutations["request_mutations"] = [m for m in mutations["request_mutations"] if "append" not in m]


def model_twice_script(doc: Doc) -> Doc:
    return next(f for f in filters(doc) if f["name"] == MODEL_TWICE)["typed_config"]["default_source_code"]


def model_twice_empty(doc: Doc) -> None:
    """The Lua filter with a script that returns at once: what the filter costs before its script does
    anything (its coroutine per request)."""
    model_twice_script(doc)["inline_string"] = "function envoy_on_request(handle) end\n"


def model_twice_no_metadata(doc: Doc) -> None:
    """The script without reading the metadata first (straight to the body): what turning the namespace
    into a Lua table costs."""
    src = model_twice_script(doc)
    src["inline_string"] = re.sub(r"local seen = .*\n.*if seen == nil.*\n", "", src["inline_string"])


def combine(*fs: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def go(doc: Doc) -> None:
        for f in fs:
            f(doc)
    return go


VARIANTS: dict[str, Callable[[Doc], None]] = {
    "full": lambda doc: None,
    "minimal": minimal,
    **{f"+{name}": plus(name) for name in ADDITIONS},
    **{f"-{name}": remove for name, remove in REMOVALS.items()},
    # other forms of the full config
    "full-stats": lambda doc: doc.update(stats_config={"stats_matcher": {"reject_all": True}}),
    "als-unbatched": als_unbatched,
    "als-no-cel": lambda doc: als(doc).pop("filter"),
    "als-route-cel": als_route_cel,
    "als-batch-1mib": als_batch(1 << 20, "1s"),
    "als-as-stats": als_as_stats,
    "als-metadata-filter": als_metadata_filter,
    "stats-usage": stats_usage(one_tag=False),
    "als-otel": als_otel,
    "response-rules-two": response_rules_two,
    "stats-usage-one-tag": stats_usage(one_tag=True),
    "stats-usage-counters": stats_usage(one_tag=True, histograms=False, tenants=False),
    "header-mutation-early": header_mutation_early,
    "header-mutation-no-path": header_mutation_no_path,
    "model-twice-empty": model_twice_empty,
    "model-twice-no-metadata": model_twice_no_metadata,
    "ext-proc-not-created": ext_proc_not_created,
    "lua-disabled": disable(*LUA),
}


def bench_config(nginx: int, extproc: int, admin: int) -> str:
    return f"""listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
log_level: warning
backends:
  - {{name: fast, api: chat, models: [bench], endpoints: ["127.0.0.1:{nginx}"]}}
  - {{name: fast-responses, api: responses, models: [bench-r], endpoints: ["127.0.0.1:{nginx}"]}}
"""


def gateway_doc(config_text: str, port: int, admin: int, extproc: int, src: Path | None = None) -> Doc:
    """deploy/envoy.yaml as benchmarks/common.py runs it (only the access-log service's log), with the
    routes and clusters the sidecar compiles for `config_text` written in."""
    from google.protobuf.json_format import MessageToDict

    from extproc.config import parse_config
    from extproc.routing.compile import compile_routes
    from extproc.routing.modes import Knowledge

    def plain(msg: Any) -> Doc:
        return json.loads(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)))

    compiled = compile_routes(parse_config(config_text), Knowledge(), {})
    doc = yaml.safe_load(render_envoy_config(port, admin, extproc, **({"src": src} if src else {})))
    doc.pop("dynamic_resources")
    hcm = _hcm(doc)
    hcm.pop("rds")
    hcm["route_config"] = plain(compiled.routes)
    hcm["access_log"] = [a for a in hcm["access_log"] if a["name"] != "envoy.access_loggers.stdout"]
    doc["static_resources"]["clusters"] += [plain(c) for c in compiled.clusters]
    return doc


def spawn_envoy(stack: Stack, name: str, doc: Doc, port: int, admin: int, callgrind: Path | None = None) -> int:
    """Envoy's pid; `callgrind`: under valgrind's callgrind, on one worker, its profile to that file."""
    cfg = stack.workdir / f"envoy-{name}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    under = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}"] if callgrind else []
    proc = stack.spawn(f"envoy-{name}", [*under, find_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id",
                                         str(port), "--concurrency", "1" if callgrind else "2", "--disable-hot-restart"])
    wait_for_envoy(admin, timeout=300 if callgrind else 20)
    return proc.pid


def instructions(stack: Stack, name: str, doc: Doc, port: int, admin: int, path: str, body: dict,
                 headers: dict[str, str], n: int) -> float:
    """Envoy's instructions per request (callgrind's Ir count over `n` requests one after another, after a
    warm-up, the access log's last batch included): a count the machine's load does not move, though
    blind to what load changes (locks, caches, the cores Envoy shares with the sidecar)."""
    out = stack.workdir / f"callgrind-{name}.out"
    pid = spawn_envoy(stack, name, doc, port, admin, out)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def ask(count: int) -> None:
        for _ in range(count):
            conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{name}: status {answer.status}")

    ask(100)
    time.sleep(1)  # the warm-up's access-log batch goes out before the count starts
    run(["callgrind_control", "--zero", str(pid)])
    ask(n)
    time.sleep(1)
    run(["callgrind_control", "--dump", str(pid)])
    conn.close()
    dumps = sorted(stack.workdir.glob(f"callgrind-{name}.out*"), key=lambda p: p.stat().st_mtime)
    total = re.search(r"^(?:totals|summary):\s+(\d+)", dumps[-1].read_text(), re.M)
    os.kill(pid, signal.SIGTERM)
    assert total is not None, dumps[-1]
    return int(total.group(1)) / n


def measure(port: int, pid: int, sidecar: int, path: str, body: dict, headers: dict[str, str],
            args: argparse.Namespace) -> tuple[float, float, float, float]:
    """(Envoy's CPU µs per request, the sidecar's, requests per second, median latency ms) of one wrk run."""
    e0, s0 = cpu_seconds(pid), cpu_seconds(sidecar)
    n, rps, lat = wrk(f"http://127.0.0.1:{port}{path}", body, headers, args.duration, args.connections)
    e1, s1 = cpu_seconds(pid), cpu_seconds(sidecar)
    return (e1 - e0) / n * 1e6, (s1 - s0) / n * 1e6, rps, lat


def quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
    ap.add_argument("--responses", action="store_true", help="Responses store:false instead of chat")
    ap.add_argument("--before", type=Path, help="another envoy.yaml (`git show REF:deploy/envoy.yaml`), run as "
                                                "the variant `before` with the same routes")
    ap.add_argument("--before-src", type=Path, help="another checkout: the variant `before` is its deploy/envoy.yaml "
                                                    "and its own sidecar (for the access-log service's cost)")
    ap.add_argument("--callgrind", type=int, metavar="N", help="instead of wrk: Envoy's instructions per request "
                                                                "over N requests, each variant under callgrind in turn")
    args = ap.parse_args()
    chosen = [v for v in args.only.split(",") if v] or list(VARIANTS)
    path, body = RESP if args.responses else CHAT
    stack = Stack()
    try:
        nginx = start_nginx(stack)
        extproc, sidecar_admin = free_port(), free_port()
        config_text = bench_config(nginx, extproc, sidecar_admin)
        cfg = stack.workdir / "sidecar.yaml"
        cfg.write_text(config_text)
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(extproc, proc=sidecar)
        port, admin = free_port(), free_port()
        alone_doc = yaml.safe_load(envoy_alone_config(port, admin))
        to_nginx = {"x-gateway-destination-endpoint": f"127.0.0.1:{nginx}"}
        if args.callgrind:
            alone = instructions(stack, "alone", alone_doc, port, admin, path, body, to_nginx, args.callgrind)
            print(f"{path}, {args.callgrind} requests one at a time, Envoy on one worker under callgrind:")
            print(f"{'variant':24} {'k instructions/req':>18} {'x alone':>8}")
            print(f"{'alone':24} {alone / 1e3:18.1f} {1:8.2f}", flush=True)
            for name in chosen:
                port, admin = free_port(), free_port()
                doc = gateway_doc(config_text, port, admin, extproc)
                VARIANTS[name](doc)
                got = instructions(stack, name, doc, port, admin, path, body, {}, args.callgrind)
                print(f"{name:24} {got / 1e3:18.1f} {got / alone:8.2f}", flush=True)
            return 0
        # each Envoy's port, pid, and the pid of the sidecar it logs to
        envoys = {"alone": (port, spawn_envoy(stack, "alone", alone_doc, port, admin), sidecar.pid)}
        for name in chosen:
            port, admin = free_port(), free_port()
            doc = gateway_doc(config_text, port, admin, extproc)
            VARIANTS[name](doc)
            envoys[name] = (port, spawn_envoy(stack, name, doc, port, admin), sidecar.pid)
        if args.before or args.before_src:
            port, admin = free_port(), free_port()
            before_port, before_sidecar = extproc, sidecar.pid
            if args.before_src:
                before_port, before_admin = free_port(), free_port()
                before_cfg = stack.workdir / "sidecar-before.yaml"
                before_cfg.write_text(bench_config(nginx, before_port, before_admin))
                proc = spawn_checkout(stack, "sidecar-before", [sys.executable, "-m", "extproc", "serve", "--config",
                                                                str(before_cfg)], args.before_src)
                wait_for_port(before_port, proc=proc)
                before_sidecar = proc.pid
            doc = gateway_doc(config_text, port, admin, before_port,
                              args.before or args.before_src / "deploy" / "envoy.yaml")
            envoys["before"] = (port, spawn_envoy(stack, "before", doc, port, admin), before_sidecar)
        # cpu, side cpu, ratio, added ms, cpu over the alone run just before it
        runs: dict[str, list[tuple[float, float, float, float, float]]] = {n: [] for n in envoys}
        order = [n for n in envoys if n != "alone"]
        for r in range(args.rounds):
            random.shuffle(order)  # no variant always runs right after another
            for name in order:
                base = measure(*envoys["alone"], path, body, to_nginx, args)
                cpu, side, rps, lat = measure(*envoys[name], path, body, {}, args)
                runs["alone"].append((base[0], base[1], 1.0, 0.0, 1.0))
                runs[name].append((cpu, side, rps / base[2], lat - base[3], cpu / base[0]))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    print(f"{path} c={args.connections}, {args.rounds} rounds x {args.duration} s, medians:")
    # `cpu x alone`: each run's Envoy CPU per request over that of Envoy alone run just before it (the
    # machine's load moves both), its median and quartiles; the most robust column on a shared machine.
    print(f"{'variant':24} {'envoy us/req':>12} {'(quartiles)':>13} {'cpu x alone':>11} {'(quartiles)':>11} "
          f"{'sidecar us/req':>14} {'x alone':>8} {'added ms':>9}")
    for name, rows in runs.items():
        cpu, side, ratio, added, rel = (statistics.median(col) for col in zip(*rows, strict=True))
        q1, q3 = quartiles([r[0] for r in rows])
        r1, r3 = quartiles([r[4] for r in rows])
        print(f"{name:24} {cpu:12.1f} {f'{q1:.0f}-{q3:.0f}':>13} {rel:11.2f} {f'{r1:.2f}-{r3:.2f}':>11} "
              f"{side:14.1f} {ratio:8.2f} {added:9.3f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
