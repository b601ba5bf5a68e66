"""What a model group costs on the fast path (Envoy alone routes it: no processor in the request path),
sidecar variants against each other in one run, interleaved (A, B, A, B, ...).

Chat clients through the real Envoy with deploy/envoy.yaml, each variant its own Envoy and sidecar (the
sidecar compiles the routes and clusters, so a variant from another checkout, `--variant NAME=SRC_DIR`,
compiles its own), in front of the same Python test upstreams:

- alone: a chat model one backend serves (its fast route straight to the backend);
- grouped: a chat model two keyless chat pools serve (its fast route to the group's fast cluster,
  whose upstream filter holds an answer's headers until its first body chunk: `routing/group_routes.py`),
  the first member answering;

each streamed (`stream_options.include_usage`, so it stays on the fast path) and not. For each: the
Envoy's and the sidecar's CPU time per request (user + system, /proc), which a shared machine's load
disturbs far less than throughput, and the median latency.

    .venv/bin/python benchmarks/fast_group.py [--n 400] [--rounds 8] [--variant before=OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, cpu_seconds, start_gateway
from extproc.local.stack import Stack
from tests.upstreams import ChatServer

KINDS = {"alone": ("solo", False), "alone, streamed": ("solo", True),
         "grouped": ("grouped", False), "grouped, streamed": ("grouped", True)}


def ask(port: int, model: str, stream: bool) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200 and (b"[DONE]" in data if stream else b"choices" in data), data[:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="requests per variant and kind")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR",
                    help="a sidecar from another checkout (default: this one alone)")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("sidecar", str(REPO))]
    solo, first, second = ChatServer(), ChatServer(), ChatServer()
    backends = (f"- {{name: solo, api: chat, models: [solo], endpoints: ['{solo.address}']}}\n"
                f"- {{name: first, api: chat, models: [grouped], endpoints: ['{first.address}']}}\n"
                f"- {{name: second, api: chat, models: [grouped], endpoints: ['{second.address}']}}\n")
    stack = Stack()
    # name -> (Envoy's port, the Envoy's and the sidecar's pids)
    targets: dict[str, tuple[int, tuple[int, int]]] = {}
    cpu = {(v, k): [0.0, 0.0] for v, _ in variants for k in KINDS}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cpu}
    try:
        for name, src in variants:
            gw = start_gateway(stack, backends, src=src)
            targets[name] = (gw.port, (stack.procs[-1].pid, gw.pids[0]))
        for port, _ in targets.values():  # warm: connections, caches
            for model, stream in KINDS.values():
                for _ in range(20):
                    ask(port, model, stream)
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for name, (port, (envoy, sidecar)) in targets.items():
                for kind, (model, stream) in KINDS.items():
                    e0, s0 = cpu_seconds((envoy,)), cpu_seconds((sidecar,))
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        ask(port, model, stream)
                        times[name, kind].append((time.perf_counter() - t0) * 1000)
                    cpu[name, kind][0] += cpu_seconds((envoy,)) - e0
                    cpu[name, kind][1] += cpu_seconds((sidecar,)) - s0
    finally:
        stack.stop()
        for server in (solo, first, second):
            server.close()
    print(f"{'variant':12s} {'kind':20s} {'median ms':>10s} {'Envoy CPU ms/req':>17s} {'sidecar CPU ms/req':>19s} "
          f"{'both':>7s}")
    for (name, kind), spent in cpu.items():
        n = len(times[name, kind])
        print(f"{name:12s} {kind:20s} {statistics.median(times[name, kind]):10.2f} {spent[0] * 1000 / n:17.3f} "
              f"{spent[1] * 1000 / n:19.3f} {(spent[0] + spent[1]) * 1000 / n:7.3f}")


if __name__ == "__main__":
    main()
