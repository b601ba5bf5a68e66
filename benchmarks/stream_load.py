"""Translated streams under load: added delay per chunk, chunk rate, and the sidecar's CPU per chunk.

The streaming rows of `run.py`, alone and repeatable, for comparing sidecar variants on a shared
machine: Envoy alone in front of `stream_upstream.py`, and one Envoy + sidecar per variant (a
Responses client on a chat-only model, so every chunk is translated). Each round measures Envoy
alone and every variant one after another (A, B, A, B, ...), so machine noise hits them alike:

- slow: `--streams` streams x `--chunks` chunks, one chunk every `--interval-ms` per stream; the
  added delay per chunk (median, p99) against Envoy alone's median;
- fast: `--fast-streams` streams x `--fast-chunks` chunks as fast as they go; chunks per second
  against Envoy alone's.

Beside both, the sidecar's own CPU seconds (user + system, from /proc) per 1,000 chunks: the
figure that holds while other processes share the cores.

    .venv/bin/python benchmarks/stream_load.py [--rounds 2] [--variant NAME=SRC_DIR ...] [--profile flame.svg]

`--variant` runs the sidecar from another checkout (its `extproc` package first on PYTHONPATH; the
default is this one), `NAME=SRC_DIR@2` with two workers. `--profile` records the first variant's slow phase of the first round with
py-spy (`pip install py-spy`) as a flame graph (an `.svg`; any other name: collapsed stacks). Writes benchmarks/results/stream_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, Stack, free_port, start_envoy_alone, start_gateway, wait_for_port
from run import pct, streams

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far (/proc/PID/stat fields 14 and 15) of a process and its children
    (the sidecar's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    total = 0.0
    for p in [pid, *(int(c) for c in (children.read_text().split() if children.exists() else ()))]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--interval-ms", type=int, default=20)
    ap.add_argument("--fast-streams", type=int, default=16)
    ap.add_argument("--fast-chunks", type=int, default=2000)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR")
    ap.add_argument("--profile", metavar="SVG")
    ap.add_argument("--native", action="store_true", help="--profile with native (C) frames")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream_load.json"))
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("sidecar", str(REPO))]

    stack = Stack()
    print(f"logs in {stack.workdir}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        streamer = free_port()
        stack.spawn("stream-upstream", [sys.executable, str(REPO / "benchmarks" / "stream_upstream.py"), str(streamer)])
        wait_for_port(streamer)
        alone = start_envoy_alone(stack)
        backends = f"- name: streamer\n  api: chat\n  models: ['stream']\n  endpoints: ['127.0.0.1:{streamer}']\n"
        gateways: dict[str, tuple[int, int]] = {}
        pythonpath = os.environ.get("PYTHONPATH")
        for name, spec in variants:
            src, _, workers = spec.partition("@")
            os.environ["PYTHONPATH"] = src
            shared = f"\nstate: {{store: sqlite, sqlite_path: {stack.workdir / name}.db}}" if workers else ""
            port = start_gateway(stack, backends, extra="fast_path: false" + shared, workers=int(workers or 1)).port
            pid = next(p.pid for p in reversed(stack.procs) if "serve" in p.args)
            gateways[name] = (port, pid)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = pythonpath

        to_upstream = {"x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}
        slow = {"x-bench-interval-ms": str(args.interval_ms)}
        chat = {"model": "stream", "stream": True, "max_tokens": args.chunks,
                "messages": [{"role": "user", "content": "go"}]}
        resp = {"model": "stream", "stream": True, "max_output_tokens": args.chunks, "input": "go"}
        fast_chat = {**chat, "max_tokens": args.fast_chunks}
        fast_resp = {**resp, "max_output_tokens": args.fast_chunks}
        streams(alone, "/v1/chat/completions", chat, to_upstream, 4)  # warm-up
        for port, _ in gateways.values():
            streams(port, "/v1/responses", resp, {}, 4)
        profiler = None
        for rnd in range(args.rounds):
            base, _, _ = streams(alone, "/v1/chat/completions", chat, {**slow, **to_upstream}, args.streams)
            med = statistics.median(base)
            _, nb, secs_b = streams(alone, "/v1/chat/completions", fast_chat, to_upstream, args.fast_streams)
            alone_rate = nb / secs_b
            for vi, (name, (port, pid)) in enumerate(gateways.items()):
                r = results.setdefault(name, {})
                if args.profile and rnd == 0 and vi == 0:
                    profiler = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "-o", args.profile, "--pid", str(pid),
                                                 "--rate", "200", *(["--native"] if args.native else ["--nonblocking"]),
                                                 "--format", "flamegraph" if args.profile.endswith(".svg") else "raw"], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.STDOUT)
                    time.sleep(1)  # attached
                c0 = cpu_seconds(pid)
                side, n, _ = streams(port, "/v1/responses", resp, slow, args.streams)
                c1 = cpu_seconds(pid)
                if profiler is not None:
                    profiler.send_signal(2)  # SIGINT: py-spy writes the flame graph and exits
                    profiler.wait(timeout=60)
                    profiler = None
                assert n == args.streams * args.chunks, n
                _, nf, secs = streams(port, "/v1/responses", fast_resp, {}, args.fast_streams)
                c2 = cpu_seconds(pid)
                for key, value in (("added_median_ms", statistics.median(side) - med),
                                   ("added_p99_ms", pct(side, 0.99) - med),
                                   ("slow_cpu_s_per_1000_chunks", (c1 - c0) / n * 1000),
                                   ("rate_vs_alone", nf / secs / alone_rate),
                                   ("fast_cpu_s_per_1000_chunks", (c2 - c1) / nf * 1000)):
                    r.setdefault(key, []).append(value)
                print(f"round {rnd} {name:12} " + " ".join(f"{k}={v[-1]:.3f}" for k, v in r.items()), flush=True)
    finally:
        stack.stop()

    print(f"\n{'variant':12} " + " ".join(f"{k:>28}" for k in next(iter(results.values()))))
    for name, r in results.items():
        print(f"{name:12} " + " ".join(f"{'/'.join(f'{x:.3f}' for x in v):>28}" for v in r.values()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
