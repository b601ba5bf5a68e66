"""Translated streams under load: added delay per chunk, chunk rate, and the sidecar's CPU per chunk.

The streaming rows of `run.py`, alone and repeatable, for comparing sidecar variants on a shared
machine: Envoy alone in front of `stream_upstream.py`, and one Envoy + sidecar per variant (a
Responses client on a chat-only model, so every chunk is translated). Each round measures Envoy
alone and every variant one after another (A, B, A, B, ...), so machine noise hits them alike:

- aligned: `--streams` streams x `--chunks` chunks, all started at once, one chunk every
  `--interval-ms` per stream (the streams tick together, as one batch-decoding server's would); the
  added delay per chunk (median, p99) against Envoy alone's median;
- paced: the same streams started evenly over one `--paced-interval-ms` and each chunk's gap drawn
  within `--paced-jitter-ms` of it (independent clients on a model's pace, 20 ms a token by
  default); the added delay per chunk against Envoy alone's median at the same load;
- fast: `--fast-streams` streams x `--fast-chunks` chunks as fast as they go; chunks per second
  against Envoy alone's.

Beside each, the sidecar's own CPU seconds (user + system, from /proc) per 1,000 chunks: the
figure that holds while other processes share the cores; and how many of the machine's cores were
busy meanwhile (/proc/stat: the stack, its Python load generator and upstream, and anything else). `--floor` adds the do-nothing processor
of the stream's message pattern (`floor_processor.py streamed_body`, every chunk answered, on the chat
stream) as one more variant: what Python gRPC alone costs at the same load; `--floor duplex_body` the
same in FULL_DUPLEX_STREAMED mode.

    .venv/bin/python benchmarks/stream_load.py [--rounds 2] [--phases aligned,paced,fast] [--floor]
        [--variant NAME=SRC_DIR ...] [--profile flame.svg]

`--variant` runs the sidecar from another checkout (its `extproc` package first on PYTHONPATH; the
default is this one), `NAME=SRC_DIR@2` with two workers. `--profile` records the first variant's first
measured phase of the first round with py-spy (`pip install py-spy`) as a flame graph (an `.svg`; any
other name: collapsed stacks). Writes benchmarks/results/stream_load.json.
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
import urllib.request
from pathlib import Path

from common import REPO, Stack, free_port, start_envoy_alone, start_floor, start_gateway, wait_for_port
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


def busy_cores() -> tuple[float, float]:
    """(CPU seconds every core spent busy, wall seconds) so far, from /proc/stat: over a phase, how much of
    the machine the whole stack (load generator included) and everything else running on it used."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS, time.monotonic()


def ext_proc_messages(admin: int) -> tuple[int, int]:
    """(messages Envoy sent the processor, messages it took from it) so far: over a phase, per chunk."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=ext_proc\\.stream_msgs_(sent|received)$",
                                timeout=10) as r:
        counts = {"sent": 0, "received": 0}
        for line in r.read().decode().splitlines():
            name, _, value = line.rpartition(":")
            counts[name.rsplit("_", 1)[1]] += int(value)
    return counts["sent"], counts["received"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--phases", default="aligned,paced,fast", help="comma-separated: aligned, paced, fast")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--interval-ms", type=int, default=20)
    ap.add_argument("--paced-interval-ms", type=int, default=20)
    ap.add_argument("--paced-jitter-ms", type=int, help="default: half the paced interval")
    ap.add_argument("--fast-streams", type=int, default=16)
    ap.add_argument("--fast-chunks", type=int, default=2000)
    ap.add_argument("--floor", action="append", default=[], metavar="PATTERN", nargs="?", const="streamed_body",
                    help="a floor processor (floor_processor.py PATTERN, default streamed_body) as one more variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR")
    ap.add_argument("--profile", metavar="SVG")
    ap.add_argument("--native", action="store_true", help="--profile with native (C) frames")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream_load.json"))
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("sidecar", str(REPO))]
    jitter = args.paced_interval_ms // 2 if args.paced_jitter_ms is None else args.paced_jitter_ms

    stack = Stack()
    print(f"logs in {stack.workdir}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        streamer = free_port()
        upstream = stack.spawn("stream-upstream", [sys.executable, str(REPO / "benchmarks" / "stream_upstream.py"),
                                                   str(streamer)]).pid
        wait_for_port(streamer)
        alone = start_envoy_alone(stack)
        backends = f"- name: streamer\n  api: chat\n  models: ['stream']\n  endpoints: ['127.0.0.1:{streamer}']\n"
        to_upstream = {"x-gateway-destination-endpoint": f"127.0.0.1:{streamer}"}
        chat = {"model": "stream", "stream": True, "max_tokens": args.chunks,
                "messages": [{"role": "user", "content": "go"}]}
        resp = {"model": "stream", "stream": True, "max_output_tokens": args.chunks, "input": "go"}
        # name -> (port, pid, Envoy's admin port, path, body, headers, fast body): the sidecar variants take the Responses
        # stream (every chunk translated), the floor the chat stream it passes through
        targets: dict[str, tuple[int, int, int, str, dict, dict[str, str], dict]] = {}
        for name, spec in variants:
            src, _, workers = spec.partition("@")
            shared = f"\nstate: {{store: sqlite, sqlite_path: {stack.workdir / name}.db}}" if workers else ""
            gw = start_gateway(stack, backends, extra="fast_path: false" + shared, workers=int(workers or 1), src=src)
            targets[name] = (gw.port, gw.pids[0], gw.admin, "/v1/responses", resp, {}, {**resp, "max_output_tokens": args.fast_chunks})
        for pattern in args.floor:
            floor = start_floor(stack, pattern, f"127.0.0.1:{streamer}")
            targets[f"floor {pattern}"] = (floor.port, floor.pids[0], floor.admin, "/v1/chat/completions", chat, {},
                                {**chat, "max_tokens": args.fast_chunks})

        # phase -> (headers to the upstream, stagger of the starts in ms)
        load = {"aligned": ({"x-bench-interval-ms": str(args.interval_ms)}, 0),
                "paced": ({"x-bench-interval-ms": str(args.paced_interval_ms), "x-bench-jitter-ms": str(jitter)},
                          args.paced_interval_ms)}
        streams(alone, "/v1/chat/completions", chat, to_upstream, 4)  # warm-up
        for port, _, _, path, body, headers, _ in targets.values():
            streams(port, path, body, headers, 4)
        profiler = None
        for rnd in range(args.rounds):
            for phase in phases:
                if phase == "fast":
                    _, nb, secs_b = streams(alone, "/v1/chat/completions", {**chat, "max_tokens": args.fast_chunks},
                                            to_upstream, args.fast_streams)
                    alone_rate = nb / secs_b
                else:
                    pace, stagger = load[phase]
                    g0, (b0, t0) = time.process_time() + cpu_seconds(upstream), busy_cores()
                    base, nb, _ = streams(alone, "/v1/chat/completions", chat, {**pace, **to_upstream}, args.streams,
                                          stagger)
                    b1, t1 = busy_cores()
                    med = statistics.median(base)
                    # the load generator (this client and the upstream, Python both) takes part of the machine too
                    for key, value in ((f"{phase}_load_generator_cpu_s_per_1000_chunks",
                                        (time.process_time() + cpu_seconds(upstream) - g0) / nb * 1000),
                                       (f"{phase}_busy_cores", (b1 - b0) / (t1 - t0))):
                        results.setdefault("envoy alone", {}).setdefault(key, []).append(value)
                for vi, (name, (port, pid, admin, path, body, headers, fast_body)) in enumerate(targets.items()):
                    r = results.setdefault(name, {})
                    if args.profile and rnd == 0 and vi == 0 and phase == phases[0]:
                        profiler = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "-o", args.profile, "--pid", str(pid),
                                                     "--rate", "200", *(["--native"] if args.native else ["--nonblocking"]),
                                                     "--format", "flamegraph" if args.profile.endswith(".svg") else "raw"], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.STDOUT)
                        time.sleep(1)  # attached
                    c0, (b0, t0), (s0, r0) = cpu_seconds(pid), busy_cores(), ext_proc_messages(admin)
                    if phase == "fast":
                        _, n, secs = streams(port, path, fast_body, headers, args.fast_streams)
                        measured = {"fast_rate_vs_alone": n / secs / alone_rate}
                    else:
                        side, n, _ = streams(port, path, body, {**headers, **pace}, args.streams, stagger)
                        assert n == args.streams * args.chunks, n
                        measured = {f"{phase}_added_median_ms": statistics.median(side) - med,
                                    f"{phase}_added_p99_ms": pct(side, 0.99) - med}
                    measured[f"{phase}_cpu_s_per_1000_chunks"] = (cpu_seconds(pid) - c0) / n * 1000
                    b1, t1 = busy_cores()
                    measured[f"{phase}_busy_cores"] = (b1 - b0) / (t1 - t0)
                    s1, r1 = ext_proc_messages(admin)
                    measured[f"{phase}_messages_per_chunk_to_processor"] = (s1 - s0) / n
                    measured[f"{phase}_messages_per_chunk_from_processor"] = (r1 - r0) / n
                    if profiler is not None:
                        profiler.send_signal(2)  # SIGINT: py-spy writes the flame graph and exits
                        profiler.wait(timeout=60)
                        profiler = None
                    for key, value in measured.items():
                        r.setdefault(key, []).append(value)
                    print(f"round {rnd} {phase:7} {name:12} " + " ".join(f"{k}={v:.3f}" for k, v in measured.items()),
                          flush=True)
    finally:
        stack.stop()

    for name, r in results.items():
        print(f"\n{name}:")
        for key, values in r.items():
            print(f"  {key:32} " + " / ".join(f"{x:.3f}" for x in values))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
