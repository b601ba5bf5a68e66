"""Pieces the benchmarks share: Envoy alone, the sidecar stack, fast upstreams, process memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from extproc.local.stack import (  # noqa: E402
    ENVOY_YAML,
    Stack,
    find_envoy,
    free_port,
    free_ports,
    render_envoy_config,
    wait_for_envoy,
    wait_for_port,
)

CHAT_BODY = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
             "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                          "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}}],
             "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}}
RESPONSES_BODY = {"id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "completed",
                  "model": "bench", "output": [{"type": "message", "id": "msg_1", "status": "completed",
                                                "role": "assistant", "content": [{"type": "output_text", "annotations": [],
                                                                                  "text": "The quick brown fox."}]}],
                  "usage": {"input_tokens": 12, "output_tokens": 10, "total_tokens": 22}}
MESSAGES_BODY = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-m",
                 "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog."}],
                 "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 10}}


# The message pattern (benchmarks/floor_processor.py) the sidecar uses for each exchange kind of run.py's
# processor rows, with a one-piece JSON answer: its floor. tests/test_benchmarks.py holds the sidecar to it.
PATTERN_OF = {
    "pass-through, usage counted": "request",  # the usage left to Envoy (json_to_metadata, the access-log service)
    "pass-through, usage_accounting: translated": "request",  # nothing reads the answer
    "Responses pass-through, stored": "streamed_body",  # its id pinned before the answer reaches the client
    "translated": "buffered_body",  # a Responses client on a chat model: the JSON answer translated whole
    "translated stream": "streamed_body",  # the same, streamed: each chunk translated as it comes
}


OUR_FILTERS = ("envoy.filters.http.ext_proc", "envoy.filters.http.header_mutation", "envoy.filters.http.match_delegate",
               "envoy.filters.http.sse_to_metadata")


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _static_routes(doc: dict) -> dict:
    """Routes in the file instead of from the sidecar over ADS (for processors that serve no xDS): only
    the processor's own routes, as the sidecar compiles them with the fast path off."""
    from google.protobuf.json_format import MessageToDict

    from extproc.config import parse_config
    from extproc.routing.compile import compile_routes
    from extproc.routing.modes import Knowledge

    cfg = parse_config("fast_path: false\nbackends: [{name: b, api: chat, models: ['*'], endpoints: ['127.0.0.1:1']}]")
    doc.pop("dynamic_resources")
    hcm = _hcm(doc)
    hcm.pop("rds")
    hcm["route_config"] = json.loads(json.dumps(MessageToDict(compile_routes(cfg, Knowledge(), {}).routes,
                                                          preserving_proto_field_name=True)))  # plain dicts for YAML
    return doc


def envoy_alone_config(listen_port: int, admin_port: int) -> str:
    """deploy/envoy.yaml minus the sidecar and its filters: the client names the endpoint itself."""
    doc = _static_routes(yaml.safe_load(render_envoy_config(listen_port, admin_port, 1)))
    hcm = _hcm(doc)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in OUR_FILTERS]
    hcm.pop("access_log", None)
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass(frozen=True)
class Hosted:
    """A hosted-style provider: TLS for `name` from a test CA, answering only with `key`."""

    name: str
    port: int
    ca: Path
    key: str


def start_envoy_alone(stack: Stack, hosted: Hosted | None = None) -> int:
    """Envoy alone; with `hosted`, also a static TLS cluster to it holding its key, taken by requests
    that carry `x-bench-hosted` (what an operator would write by hand without the sidecar)."""
    port, admin = free_port(), free_port()
    doc = yaml.safe_load(envoy_alone_config(port, admin))
    if hosted is not None:
        doc["static_resources"]["clusters"].append({
            "name": "hosted", "type": "LOGICAL_DNS", "dns_lookup_family": "V4_PREFERRED", "connect_timeout": "10s",
            "load_assignment": {"cluster_name": "hosted", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": hosted.name, "port_value": hosted.port}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": hosted.name, "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": str(hosted.ca)},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": hosted.name}}]}}}}})
        host = _hcm(doc)["route_config"]["virtual_hosts"][0]
        host["routes"].insert(0, {"match": {"prefix": "/", "headers": [{"name": "x-bench-hosted", "present_match": True}]},
                                  "route": {"cluster": "hosted", "host_rewrite_literal": f"{hosted.name}:{hosted.port}"},
                                  "request_headers_to_add": [{"header": {"key": "authorization",
                                                                         "value": "Bearer " + hosted.key},
                                                              "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]})
    return _spawn_envoy(stack, doc, port, admin)


@dataclass(frozen=True)
class Processed:
    """Envoy in front of an ext_proc server: Envoy's port and admin port, and the processor's processes
    (for their CPU time)."""

    port: int
    admin: int
    pids: tuple[int, ...]


def start_gateway(stack: Stack, backends: str, extra: str = "", workers: int = 1, src: Path | str = REPO) -> Processed:
    """Envoy (deploy/envoy.yaml, stdout access log off) + the sidecar with these backends, running the
    `extproc` of checkout `src` (another one, to compare two versions in one run; `spawn_checkout`)."""
    extproc_port = free_ports(workers)
    admin_port = free_ports(workers)
    while admin_port <= extproc_port + workers - 1 and extproc_port <= admin_port + workers - 1:
        admin_port = free_ports(workers)  # two free ranges may overlap: they were not held
    cfg = stack.workdir / f"config-{extproc_port}.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{extproc_port}\nadmin_listen: 127.0.0.1:{admin_port}\nlog_level: warning\n"
                   f"{extra}\nbackends:\n{textwrap.indent(backends.strip(), '  ')}\n")
    serve = [sys.executable, "-m", "extproc", "serve", "--config", str(cfg), *(["--workers", str(workers)] if workers > 1 else [])]
    sidecar = spawn_checkout(stack, f"sidecar-{extproc_port}", serve, src)
    for i in range(workers):
        wait_for_port(extproc_port + i, proc=sidecar)
    return Processed(*start_envoy_with_processor(stack, extproc_port, workers, xds=True,
                                                 envoy_yaml=Path(src) / "deploy" / "envoy.yaml"), (sidecar.pid,))


def spawn_checkout(stack: Stack, name: str, args: list[str], src: Path | str) -> subprocess.Popen[bytes]:
    """`args` (a `python -m extproc ...`) on checkout `src`'s code: `src` first on PYTHONPATH, started from
    the stack's directory, since `python -m` puts its working directory before PYTHONPATH (started from a
    checkout's root, every variant ran that checkout's code)."""
    cwd = os.getcwd()
    os.chdir(stack.workdir)
    try:
        return stack.spawn(name, args, {"PYTHONPATH": str(src)})
    finally:
        os.chdir(cwd)


def start_floor(stack: Stack, pattern: str, endpoint: str, workers: int = 1) -> Processed:
    """Envoy in front of `workers` floor processors of `pattern` (benchmarks/floor_processor.py) on
    consecutive ports, as the sidecar's workers are, routing every request to `endpoint`."""
    base = free_ports(workers)
    procs = [stack.spawn(f"floor-{pattern}-{base + i}", [sys.executable, str(REPO / "benchmarks" / "floor_processor.py"),
                                                          str(base + i), endpoint, pattern])
             for i in range(workers)]
    for i, proc in enumerate(procs):
        wait_for_port(base + i, proc=proc)
    return Processed(*start_envoy_with_processor(stack, base, workers), tuple(p.pid for p in procs))


def start_envoy_with_processor(stack: Stack, extproc_port: int, workers: int = 1,
                               xds: bool = False, envoy_yaml: Path = ENVOY_YAML) -> tuple[int, int]:
    """deploy/envoy.yaml (stdout access log off) in front of an ext_proc server on `extproc_port` (and the
    next ports, one per worker: Envoy spreads streams over them). `xds`: the routes come from it (the
    sidecar); else they are written into the file (a processor that serves no xDS). Envoy's port and admin port."""
    port, admin = free_port(), free_port()
    doc = yaml.safe_load(render_envoy_config(port, admin, extproc_port, src=envoy_yaml))  # the checkout's own
    if not xds:
        _static_routes(doc)
    hcm = _hcm(doc)
    hcm["access_log"] = [a for a in hcm["access_log"] if a["name"] != "envoy.access_loggers.stdout"]  # no per-request line to stdout
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": extproc_port + i}}}}
                for i in range(workers)]
    return _spawn_envoy(stack, doc, port, admin), admin


def _spawn_envoy(stack: Stack, doc: dict, port: int, admin: int) -> int:
    cfg = stack.workdir / f"envoy-{port}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    stack.spawn(f"envoy-{port}", [find_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id", str(port),
                                  "--concurrency", "2", "--disable-hot-restart"])
    wait_for_envoy(admin)
    return port


def start_hosted(stack: Stack, name: str = "bench.provider.localhost") -> Hosted:
    """nginx as a keyed hosted provider over TLS, for a name that resolves to loopback (RFC 6761)."""
    from tests.pki import CA

    root = Path(tempfile.mkdtemp(prefix="bench-pki-", dir=stack.workdir))
    ca = CA(root, "bench-ca")
    key = "sk-bench-hosted-key"
    port = start_nginx(stack, tls=ca.issue("provider", [name]), key=key)
    return Hosted(name, port, ca.path, key)


def start_nginx(stack: Stack, tls: tuple[Path, Path] | None = None, key: str | None = None) -> int:
    """A fast canned upstream (Debian's nginx): the three APIs answer at once, non-streaming; with `tls`
    (certificate and key files) HTTPS only, and with `key` a 401 for any request without it."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="bench-nginx-", dir=stack.workdir))
    root.chmod(0o777)
    listen = f"127.0.0.1:{port}" + (f" ssl;\n    ssl_certificate {tls[0]};\n    ssl_certificate_key {tls[1]}" if tls else "")
    check = f"if ($http_authorization != \"Bearer {key}\") {{ return 401 '{{}}'; }}" if key else ""

    def body(doc: dict) -> str:
        return json.dumps(doc).replace("'", "\\'")

    (root / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  keepalive_requests 1000000;
  server {{
    listen {listen};
    default_type application/json;
    {check}
    location = /v1/chat/completions {{ return 200 '{body(CHAT_BODY)}'; }}
    location = /v1/responses {{ return 200 '{body(RESPONSES_BODY)}'; }}
    location = /v1/messages {{ return 200 '{body(MESSAGES_BODY)}'; }}
  }}
}}
""")
    stack.spawn(f"nginx-{port}", [nginx, "-c", str(root / "nginx.conf"), "-p", str(root)])
    wait_for_port(port)
    return port


def envoy_counters(admin: int) -> dict[str, int]:
    """Envoy's ext_proc messages to the processor and requests completed so far (its admin stats):
    their ratio over a run is the messages per request."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^http\\..*(ext_proc.stream_msgs_sent|"
                                "downstream_rq_completed)$", timeout=10) as r:
        out = {"messages": 0, "requests": 0}
        for line in r.read().decode().splitlines():
            name, _, value = line.rpartition(":")
            if not name.startswith("http.admin."):  # the admin listener's own requests (this one)
                out["messages" if name.endswith("stream_msgs_sent") else "requests"] += int(value)
        return out


def _family(pid: int) -> list[int]:
    """A process and its children (the sidecar's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    for p in _family(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU seconds of these processes and their children so far: per request, the robust
    figure on a shared machine (other load slows a process down, but barely changes what it spends)."""
    total = 0
    for pid in pids:
        for p in _family(pid):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / _TICK


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)
