"""The performance table: the sidecar against Envoy alone and against LiteLLM, in one run.

Starts the real stack (Envoy from the wheel, the sidecar, nginx as a fast canned upstream, a fast
asyncio streaming upstream), loads it with wrk (non-streaming) and an asyncio client (streaming), and
prints scenario, Envoy alone, the floor, sidecar, ratios, peer, ratio. Each processor row names its
message pattern in brackets, and its floor is benchmarks/floor_processor.py for that pattern, measured
right after Envoy alone and right before the sidecar; the CPU milliseconds per request of the sidecar
and of its floor (both processes' user + system time over the requests served) hold better than
throughput when the machine is shared. Writes benchmarks/results/run.json.

    .venv/bin/python benchmarks/run.py [--duration 10] [--no-peer] [--only fastpath,passthrough,hosted,translated,messages,workers,...]

Needs Debian's wrk and nginx (`apt-get install wrk nginx-light`). The peer, LiteLLM's proxy, is
installed into benchmarks/.peer/ on first use; its rows are skipped with a message when it cannot be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import (
    PATTERN_OF,
    REPO,
    Processed,
    Stack,
    cpu_seconds,
    envoy_counters,
    free_port,
    rss_mb,
    run,
    start_envoy_alone,
    start_floor,
    start_gateway,
    start_hosted,
    start_nginx,
    wait_for_port,
)

LITELLM = "litellm[proxy]==1.106.12"
PEER_KEY = "sk-bench-peer-key"
PEER_AUTH = {"authorization": "Bearer " + PEER_KEY}
PEER_VENV = REPO / "benchmarks" / ".peer" / "litellm"
CHAT_REQ = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]}
RESP_REQ = {"model": "bench", "input": "Say something short."}
RESP_FAST_REQ = {"model": "bench-r", "input": "Say something short.", "store": False}
RESP_STORED_REQ = {"model": "bench-r", "input": "Say something short."}
HOSTED_REQ = {"model": "bench-hosted", "messages": CHAT_REQ["messages"]}
MSG_REQ = {"model": "bench", "max_tokens": 64, "messages": CHAT_REQ["messages"]}  # Anthropic client, chat model
MSG_FAST_REQ = {**MSG_REQ, "model": "bench-m"}  # Anthropic client, `api: messages` backend: the fast path
ANTHROPIC = {"anthropic-version": "2023-06-01"}
FLOOR_TARGET = ">= 0.9 x floor"


# -- load generators ----------------------------------------------------------------------------

def wrk(url: str, body: dict, headers: dict[str, str], duration: int, connections: int) -> tuple[float, float]:
    """(requests per second, median latency ms) from Debian's wrk, POSTing `body`."""
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"wrk-{os.getpid()}-{free_port()}.lua"
    lua_headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in {"content-type": "application/json", **headers}.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{json.dumps(body)}]]\n{lua_headers}')
    out = run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]).stdout
    script.unlink()
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{url}: {non2xx.group(1)} failed requests\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    median = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    return rps, median


# chat, Responses, Messages deltas (not the Responses `*.done` events, which repeat the text)
_T_RE = re.compile(rb'"(?:content|delta|text_delta",\s*"text)":\s*"(\d+)\|')


async def _stream(port: int, path: str, body: dict, headers: dict[str, str], delays: list[float],
                  start_after: float = 0.0) -> int:
    """One streamed request, sent `start_after` seconds from now; appends each chunk's delay (ms, upstream
    write to here); returns chunks."""
    if start_after:
        await asyncio.sleep(start_after)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {"host": "bench", "content-type": "application/json",
                                                  "content-length": str(len(payload)), **headers}.items())
    writer.write(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + payload)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{path}: {status!r} {await reader.read(500)!r}")
    n, tail = 0, b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.monotonic_ns()
        buf = tail + data
        last = 0
        for m in _T_RE.finditer(buf):
            delays.append((now - int(m.group(1))) / 1e6)
            n += 1
            last = m.end()
        tail = buf[max(last, len(buf) - 64):]
        if b"0\r\n\r\n" in data[-7:] or b"[DONE]" in data or any(end in data[-2000:] for end in
                                                                        (b"response.completed", b"message_stop")):
            break
    writer.close()
    return n


def streams(port: int, path: str, body: dict, headers: dict[str, str], concurrency: int,
            stagger_ms: float = 0.0) -> tuple[list[float], int, float]:
    """(chunk delays, chunks received, seconds) for `concurrency` simultaneous streams; with `stagger_ms`
    their starts spread evenly over that time (independent clients), else all at once."""
    async def go() -> tuple[list[float], int, float]:
        delays: list[float] = []
        t0 = time.monotonic()
        counts = await asyncio.gather(*(_stream(port, path, body, headers, delays, i * stagger_ms / concurrency / 1000)
                                        for i in range(concurrency)))
        return delays, sum(counts), time.monotonic() - t0
    return asyncio.run(go())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the peer -----------------------------------------------------------------------------------

def litellm_bin() -> str | None:
    exe = PEER_VENV / "bin" / "litellm"
    if exe.exists():
        return str(exe)
    print(f"installing the peer ({LITELLM}) into {PEER_VENV} ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", LITELLM], check=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"peer rows skipped: LiteLLM could not be installed ({e})")
        shutil.rmtree(PEER_VENV, ignore_errors=True)
        return None
    return str(exe) if exe.exists() else None


def start_litellm(stack: Stack, chat_port: int) -> int | None:
    exe = litellm_bin()
    if exe is None:
        return None
    port = free_port()
    cfg = stack.workdir / f"litellm-{port}.yaml"
    cfg.write_text(f"""model_list:
  - model_name: bench
    litellm_params:
      model: deepseek/bench   # an OpenAI-compatible chat provider LiteLLM has no Responses API for: it bridges
      api_base: http://127.0.0.1:{chat_port}/v1
      api_key: none
  - model_name: bench-chat
    litellm_params:
      model: hosted_vllm/bench   # a chat provider without a Messages API of its own: /v1/messages is bridged
      api_base: http://127.0.0.1:{chat_port}/v1
      api_key: none
  - model_name: bench-m
    litellm_params:
      model: anthropic/bench-m   # an Anthropic-compatible server: LiteLLM's /v1/messages passes it on
      api_base: http://127.0.0.1:{chat_port}
      api_key: none
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  master_key: {PEER_KEY}
""")
    proc = stack.spawn(f"litellm-{port}", [exe, "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1",
                                           "--num_workers", "1"], {"LITELLM_LOG": "ERROR", "DISABLE_TELEMETRY": "1"})
    try:
        wait_for_port(port, timeout=120, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        print(f"peer rows skipped: LiteLLM did not start ({e}); see {stack.workdir}")
        return None
    return port


# -- scenarios ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--no-peer", action="store_true", help="skip LiteLLM")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "run.json"))
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path("/usr/sbin/nginx").exists():
            print(f"{tool} is missing: apt-get install wrk nginx-light")
            return 1
    only = set(filter(None, args.only.split(",")))
    rows: list[dict] = []

    def row(scenario: str, alone: float | None, sidecar: float, peer: float | None, unit: str, target: str,
            floor: float | None = None, cpu: tuple[float, float | None] | None = None) -> None:
        """One line of the table; `floor`: its message pattern's floor in the same unit, `cpu`: the
        sidecar's and the floor's CPU milliseconds per request."""
        r = {"scenario": scenario, "unit": unit, "envoy_alone": alone, "sidecar": sidecar, "peer": peer,
             "floor": floor, "ratio_vs_alone": sidecar / alone if alone else None,
             "ratio_vs_peer": sidecar / peer if peer else None,
             "ratio_vs_floor": sidecar / floor if floor and unit != "ms" else None,
             "cpu_ms_per_request": cpu[0] if cpu else None, "floor_cpu_ms_per_request": cpu[1] if cpu else None,
             # the floor's CPU per request over the sidecar's: the share of its floor by the robust figure
             "cpu_ratio_vs_floor": cpu[1] / cpu[0] if cpu and cpu[1] and cpu[0] else None,
             "target": target}
        rows.append(r)
        print(f"  {scenario:52} alone={_f(alone)} floor={_f(floor)} sidecar={_f(sidecar)} peer={_f(peer)} {unit}  "
              f"x_alone={_f(r['ratio_vs_alone'])} x_floor={_f(r['ratio_vs_floor'])} x_peer={_f(r['ratio_vs_peer'])}"
              + (f" cpu={cpu[0]:.2f}/{_f(cpu[1])} ms/req x_floor_cpu={_f(r['cpu_ratio_vs_floor'])}" if cpu else "")
              + f"  [{target}]", flush=True)

    stack = Stack()
    try:
        nginx = start_nginx(stack)
        streamer = free_port()
        stack.spawn("stream-upstream", [sys.executable, str(REPO / "benchmarks" / "stream_upstream.py"), str(streamer)])
        wait_for_port(streamer)
        hosted = start_hosted(stack)
        alone = start_envoy_alone(stack, hosted)
        hosted_key = stack.workdir / "hosted.key"
        hosted_key.write_text(hosted.key)
        backends = f"""
- name: fast
  api: chat
  models: ["bench"]
  endpoints: ["127.0.0.1:{nginx}"]
- name: fast-responses
  api: responses
  models: ["bench-r"]
  endpoints: ["127.0.0.1:{nginx}"]
- name: fast-messages
  api: messages
  models: ["bench-m"]
  endpoints: ["127.0.0.1:{nginx}"]
- name: streamer
  api: chat
  models: ["stream"]
  endpoints: ["127.0.0.1:{streamer}"]
- name: hosted
  api: chat
  models: ["bench-hosted"]
  url: https://{hosted.name}:{hosted.port}
  ca_file: {hosted.ca}
  api_key_file: {hosted_key}
"""
        # The processor path rows keep measuring the processor: fast_path off sends everything through it.
        gw = start_gateway(stack, backends, extra="fast_path: false")
        gw_lean = start_gateway(stack, backends, extra="usage_accounting: translated\nfast_path: false")
        gw_fast = start_gateway(stack, backends)  # the default: fast path on, usage counted (access-log service)
        sidecar_pid = gw.pids[0]
        to_nginx = {"x-gateway-destination-endpoint": f"127.0.0.1:{nginx}"}
        peer = None if args.no_peer else start_litellm(stack, nginx)
        d, c8 = args.duration, 8
        floors: dict[tuple[str, int], Processed] = {}
        per_core: dict[str, float] = {}  # requests per CPU-second of the sidecar, by row name

        def against_alone(port: int, path: str, body: dict, c: int) -> tuple[float, float, float, float]:
            """(alone rps, alone median, rps, median): Envoy alone measured right before, since the load
            of a shared machine drifts between runs."""
            base_rps, base_lat = wrk(f"http://127.0.0.1:{alone}{path}", body, to_nginx, d, c)
            return base_rps, base_lat, *wrk(f"http://127.0.0.1:{port}{path}", body, {}, d, c)

        def loaded(target: Processed, path: str, body: dict, c: int) -> tuple[float, float, float, float]:
            """(rps, median ms, the processor's CPU ms per request, Envoy's ext_proc messages per request)
            through `target`."""
            before, counted = cpu_seconds(target.pids), envoy_counters(target.admin)
            rps, lat = wrk(f"http://127.0.0.1:{target.port}{path}", body, {}, d, c)
            after = envoy_counters(target.admin)
            messages = (after["messages"] - counted["messages"]) / max(1, after["requests"] - counted["requests"])
            return rps, lat, (cpu_seconds(target.pids) - before) * 1000 / max(1.0, rps * d), messages

        def processor_row(name: str, target: Processed, path: str, body: dict, c: int, kind: str,
                          workers: int = 1, peer_port: int | None = None) -> float:
            """A processor row against Envoy alone (the chat request, to nginx) and against the floor of its
            exchange kind's message pattern (common.PATTERN_OF; as many floor processes as the sidecar has
            workers), measured one after the other; the sidecar's rps."""
            pattern = PATTERN_OF[kind]
            if (pattern, workers) not in floors:
                floors[pattern, workers] = start_floor(stack, pattern, f"127.0.0.1:{nginx}", workers)
            base_rps, base_lat = wrk(f"http://127.0.0.1:{alone}/v1/chat/completions", CHAT_REQ, to_nginx, d, c)
            floor_rps, floor_lat, floor_cpu, floor_messages = loaded(floors[pattern, workers], path, body, c)
            rps, lat, cpu, messages = loaded(target, path, body, c)
            per_core[name] = 1000 / cpu if cpu else 0.0
            peer_rps = wrk(f"http://127.0.0.1:{peer_port}{path}", body, PEER_AUTH, d, c)[0] if peer_port else None
            row(f"{name} throughput, c={c} [{pattern}]", base_rps, rps, peer_rps, "req/s",
                FLOOR_TARGET + (", >= 3 x peer" if peer_port else ""), floor=floor_rps, cpu=(cpu, floor_cpu))
            row(f"{name} added median latency, c={c}", None, lat - base_lat, None, "ms", "<= 1 ms",
                floor=floor_lat - base_lat)
            row(f"{name} ext_proc messages per request, c={c}", None, messages, None, "messages", "",
                floor=floor_messages)
            return rps

        if not only or only & {"passthrough", "fastpath"}:  # fastpath: these rows alone
            print("pass-through (chat client, chat model), wrk -c8 and -c1:")
            for c in (c8, 1):
                base_rps, base_lat, rps, lat = against_alone(gw_fast.port, "/v1/chat/completions", CHAT_REQ, c)
                row(f"fast path throughput, usage counted, c={c}", base_rps, rps, None, "req/s", ">= 0.75 x alone"
                    if c == c8 else ">= 0.60 x alone")
                row(f"fast path added median latency, c={c}", None, lat - base_lat, None, "ms",
                    "<= 0.15 ms" if c == 1 else "")
            base_rps, _, rps, _ = against_alone(gw_fast.port, "/v1/responses", RESP_FAST_REQ, c8)
            row("fast path throughput, Responses store:false, c=8", base_rps, rps, None, "req/s", ">= 0.75 x alone")
        if not only or "passthrough" in only:
            # Each processor row names its exchange kind, whose message pattern names its floor.
            for c in (c8, 1):
                processor_row("processor path, usage accounting on", gw, "/v1/chat/completions", CHAT_REQ, c,
                              "pass-through, usage counted")
            processor_row("processor path, usage_accounting: translated", gw_lean, "/v1/chat/completions", CHAT_REQ,
                          c8, "pass-through, usage_accounting: translated")
            processor_row("processor path, Responses pass-through, stored", gw, "/v1/responses", RESP_STORED_REQ, c8,
                          "Responses pass-through, stored")
        if not only or "workers" in only:
            print("scale out: each exchange kind through 1 and 2 sidecar workers (`serve --workers`, SQLite state "
                  "for both), wrk -c8:")
            scaled = {(accounting, n): start_gateway(stack, backends, workers=n, extra=(
                f"usage_accounting: {accounting}\nfast_path: false\n"
                f"state: {{store: sqlite, sqlite_path: {stack.workdir / f'state-{accounting}-{n}.db'}}}"))
                for accounting in ("all", "translated") for n in (1, 2)}
            for kind, accounting, path, body in (
                    ("pass-through, usage counted", "all", "/v1/chat/completions", CHAT_REQ),
                    ("pass-through, usage_accounting: translated", "translated", "/v1/chat/completions", CHAT_REQ),
                    ("Responses pass-through, stored", "all", "/v1/responses", RESP_STORED_REQ),
                    ("translated", "all", "/v1/responses", RESP_REQ)):
                by_workers = {n: processor_row(f"{kind}, {n} worker{'s' if n > 1 else ''}", scaled[accounting, n], path,
                                               body, c8, kind, workers=n) for n in (1, 2)}
                row(f"{kind}, 1 -> 2 workers", by_workers[1], by_workers[2], None, "req/s", "near 2 x (2 cores)")
                for n in (1, 2):
                    name = f"{kind}, {n} worker{'s' if n > 1 else ''}"
                    row(f"{name}: requests per sidecar CPU-second", None, per_core[name], None, "req/s/core", "")
        if not only or "hosted" in only:
            print("keyed hosted provider over TLS (url:, Envoy holds the key), fast path, wrk -c8 and -c1:")
            for c in (c8, 1):
                base_rps, base_lat = wrk(f"http://127.0.0.1:{alone}/v1/chat/completions", HOSTED_REQ,
                                         {"x-bench-hosted": "1"}, d, c)  # a static cluster holding the key
                rps, lat = wrk(f"http://127.0.0.1:{gw_fast.port}/v1/chat/completions", HOSTED_REQ, {}, d, c)
                row(f"keyed hosted fast path throughput, c={c}", base_rps, rps, None, "req/s", ">= 0.60 x alone")
                row(f"keyed hosted fast path added median latency, c={c}", None, lat - base_lat, None, "ms", "")
        if not only or "translated" in only:
            print("translated non-streaming (Responses client, chat-only model), wrk -c8:")
            processor_row("translated", gw, "/v1/responses", RESP_REQ, c8, "translated", peer_port=peer)
        if not only or "messages" in only:
            print("Anthropic Messages clients (POST /v1/messages), wrk -c8:")
            base_rps, _ = wrk(f"http://127.0.0.1:{alone}/v1/chat/completions", CHAT_REQ, to_nginx, d, c8)
            rps, _ = wrk(f"http://127.0.0.1:{gw.port}/v1/messages", MSG_REQ, ANTHROPIC, d, c8)
            peer_rps = peer_wrk(peer, "/v1/messages", {**MSG_REQ, "model": "bench-chat"}, {**PEER_AUTH, **ANTHROPIC}, d, c8)
            row("Messages translated to chat throughput", base_rps, rps, peer_rps, "req/s",
                ">= 0.25 x alone, >= 3 x peer")
            base_rps, _ = wrk(f"http://127.0.0.1:{alone}/v1/messages", MSG_FAST_REQ, {**to_nginx, **ANTHROPIC}, d, c8)
            rps, _ = wrk(f"http://127.0.0.1:{gw_fast.port}/v1/messages", MSG_FAST_REQ, ANTHROPIC, d, c8)
            peer_rps = peer_wrk(peer, "/v1/messages", MSG_FAST_REQ, {**PEER_AUTH, **ANTHROPIC}, d, c8)
            row("fast path throughput, Messages to api: messages, c=8", base_rps, rps, peer_rps, "req/s",
                ">= 0.60 x alone")
            print("Messages translated to chat, streamed as fast as it goes: 16 streams x 2000 chunks:")
            body_m = {"model": "stream", "stream": True, "max_tokens": 2000, "messages": CHAT_REQ["messages"]}
            _, n, secs = streams(gw.port, "/v1/messages", body_m, ANTHROPIC, 16)
            assert n == 16 * 2000, n
            _, nb, secs_b = streams(alone, "/v1/chat/completions", {**body_m, "model": "stream"},
                                    {"x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}, 16)
            peer_cps = _litellm_stream_rate(stack, streamer, "/v1/messages", {**body_m, "model": "bench-chat"}) if peer else None
            row("Messages translated chunks per second", nb / secs_b, n / secs, peer_cps, "chunks/s", ">= 3 x peer")
        if not only or "streaming" in only:
            print("translated streaming: 100 streams x 200 chunks, one chunk every 20 ms:")
            slow = {"x-bench-interval-ms": "20"}
            body_c = {"model": "stream", "stream": True, "max_tokens": 200, "messages": CHAT_REQ["messages"]}
            body_r = {"model": "stream", "stream": True, "max_output_tokens": 200, "input": "go"}
            base, _, _ = streams(alone, "/v1/chat/completions", body_c,
                                 {**slow, "x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}, 100)
            side, n, _ = streams(gw.port, "/v1/responses", body_r, slow, 100)
            assert n == 100 * 200, n
            med = statistics.median(base)
            row("added per-chunk delay, median", None, statistics.median(side) - med, None, "ms", "<= 1 ms")
            row("added per-chunk delay, p99", None, pct(side, 0.99) - med, None, "ms", "<= 5 ms")
            print("translated streaming, paced: 100 independent streams x 200 chunks, 10-30 ms apart:")
            paced = {"x-bench-interval-ms": "20", "x-bench-jitter-ms": "10"}  # started over 20 ms, not at once
            base, _, _ = streams(alone, "/v1/chat/completions", body_c,
                                 {**paced, "x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}, 100, 20)
            side, n, _ = streams(gw.port, "/v1/responses", body_r, paced, 100, 20)
            assert n == 100 * 200, n
            med = statistics.median(base)
            row("added per-chunk delay, paced, median", None, statistics.median(side) - med, None, "ms", "<= 1 ms")
            row("added per-chunk delay, paced, p99", None, pct(side, 0.99) - med, None, "ms", "<= 5 ms")
            print("translated streaming, as fast as it goes: 16 streams x 2000 chunks:")
            fast_r = {**body_r, "max_output_tokens": 2000}
            _, n, secs = streams(gw.port, "/v1/responses", fast_r, {}, 16)
            _, nb, secs_b = streams(alone, "/v1/chat/completions", {**body_c, "max_tokens": 2000},
                                    {"x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}, 16)
            pattern = PATTERN_OF["translated stream"]
            streamed_floor = start_floor(stack, pattern, f"127.0.0.1:{streamer}")  # the chat stream, every chunk answered
            _, nf, secs_f = streams(streamed_floor.port, "/v1/chat/completions", {**body_c, "max_tokens": 2000}, {}, 16)
            peer_cps = _litellm_stream_rate(stack, streamer) if peer else None
            row(f"translated chunks per second [{pattern}]", nb / secs_b, n / secs, peer_cps, "chunks/s",
                FLOOR_TARGET + ", >= 3 x peer", floor=nf / secs_f)
        if not only or "memory" in only:
            print("memory: 500 streams in flight (one chunk every 50 ms, 10 s each):")
            idle = rss_mb(sidecar_pid)
            body_r = {"model": "stream", "stream": True, "max_output_tokens": 200, "input": "go"}
            peak: list[float] = []

            async def sample() -> None:
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    peak.append(rss_mb(sidecar_pid))

            async def load() -> None:
                delays: list[float] = []
                await asyncio.gather(sample(), *(_stream(gw.port, "/v1/responses", body_r, {"x-bench-interval-ms": "50"}, delays)
                                                 for _ in range(500)))
            asyncio.run(load())
            row("sidecar RSS idle", None, idle, None, "MB", "")
            row("sidecar RSS, 500 streams in flight", None, max(peak), None, "MB", "<= 150 MB")
    finally:
        stack.stop()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": _machine(), "duration_s": args.duration, "rows": rows}, indent=2))
    print(f"\n{'scenario':80} {'alone':>8} {'floor':>8} {'sidecar':>8} {'x alone':>7} {'x floor':>7} {'peer':>8} "
          f"{'x peer':>6} {'cpu ms/req':>11} {'x floor cpu':>11}  unit      target")
    for r in rows:
        cpu = f"{_f(r['cpu_ms_per_request'])}/{_f(r['floor_cpu_ms_per_request'])}" if r["cpu_ms_per_request"] else ""
        print(f"{r['scenario']:80} {_f(r['envoy_alone']):>8} {_f(r['floor']):>8} {_f(r['sidecar']):>8} "
              f"{_f(r['ratio_vs_alone']):>7} {_f(r['ratio_vs_floor']):>7} {_f(r['peer']):>8} {_f(r['ratio_vs_peer']):>6} "
              f"{cpu:>11} {_f(r.get('cpu_ratio_vs_floor')):>11}  {r['unit']:9} {r['target']}")
    print(f"\nwritten to {out}")
    return 0


_PEER_STREAMERS: dict[int, int | None] = {}  # one LiteLLM on the streaming upstream, for every streamed row


def _litellm_stream_rate(stack: Stack, streamer: int, path: str = "/v1/responses", body: dict | None = None) -> float | None:
    if streamer not in _PEER_STREAMERS:
        _PEER_STREAMERS[streamer] = start_litellm(stack, streamer)
    port = _PEER_STREAMERS[streamer]
    if port is None:
        return None
    body = body or {"model": "bench", "stream": True, "max_output_tokens": 2000, "input": "go"}
    _, n, secs = streams(port, path, body, {**PEER_AUTH, **ANTHROPIC}, 16)
    return n / secs if n else None


def peer_wrk(peer: int | None, path: str, body: dict, headers: dict[str, str], d: int, c: int) -> float | None:
    """The peer's requests per second, or None (said why) when it cannot serve this row."""
    if peer is None:
        return None
    try:  # LiteLLM's first request on a route takes a second or more (imports, clients): not measured
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{peer}{path}", json.dumps(body).encode(),
                                                      {"content-type": "application/json", **headers}), timeout=60).read()
        rps = wrk(f"http://127.0.0.1:{peer}{path}", body, headers, d, c)[0]
    except (RuntimeError, OSError) as e:
        print(f"  peer row skipped: {str(e)[:300]}")
        return None
    return rps or None  # none answered in time


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}"


if __name__ == "__main__":
    sys.exit(main())
