"""What failover costs, each kind against the others in the same run, and sidecar variants against each other,
all interleaved (variant A's kinds, variant B's kinds, A's, B's, ...).

Responses requests on chat-only backends (translated), through the real Envoy with deploy/envoy.yaml and the
sidecar, each variant its own Envoy and sidecar (a variant from another checkout, `--variant NAME=SRC_DIR`,
runs and compiles its own code), in front of the same Python test upstreams:

- alone: a model one backend serves (today's path, which a model outside any group keeps): the baseline;
- first answers: a model of a group whose first member serves it (the group's cluster and the attempt's
  upstream filters, no failover);
- failed over: a model whose first member always answers 503, served by the second (one failed attempt
  plus the served one).

For each: median latency, and the sidecar's and Envoy's CPU time per request (user + system, /proc), which a
shared machine's load disturbs far less than throughput; then, per variant, what each grouped kind adds to
the baseline (CPU ms per request of both processes, and median ms): the cost of the path where the first
member answers, and the cost of one failover.

    .venv/bin/python benchmarks/failover.py [--n 300] [--rounds 6] [--variant before=OTHER_CHECKOUT ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, cpu_seconds, start_gateway
from extproc.local.stack import Stack
from tests.upstreams import ChatServer, Reply

KINDS = {"alone": "solo", "first answers": "grouped", "failed over": "failing"}
BASELINE = "alone"


def post(port: int, model: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/responses", json.dumps({"model": model, "input": "hi"}),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200 and b'"output"' in data, data[:300]


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Runs the benchmark and prints its table; returns (median ms, sidecar and Envoy CPU ms per request)
    for each (variant, kind)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="requests per variant and kind")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR",
                    help="a sidecar from another checkout (default: this one alone); repeat to compare")
    args = ap.parse_args(argv)
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("sidecar", str(REPO))]
    ok, second, failing = ChatServer(), ChatServer(), ChatServer()
    failing.next_reply = lambda echo: Reply(error=(503, {"error": {  # type: ignore[method-assign]
        "message": "overloaded", "type": "server_error", "param": None, "code": None}}))
    backends = (f"- {{name: alone, api: chat, models: [solo], endpoints: ['{ok.address}']}}\n"
                f"- {{name: first, api: chat, models: [grouped], endpoints: ['{ok.address}']}}\n"
                f"- {{name: broken, api: chat, models: [failing], endpoints: ['{failing.address}']}}\n"
                f"- {{name: second, api: chat, models: [grouped, failing], endpoints: ['{second.address}']}}\n")
    stack = Stack()
    targets: dict[str, tuple[int, int, int]] = {}  # name -> (Envoy's port, Envoy's pid, the sidecar's pid)
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v, _ in variants for k in KINDS}
    cpu: dict[tuple[str, str], list[float]] = {key: [0.0, 0.0] for key in times}  # sidecar, Envoy
    try:
        for name, src in variants:
            # the failing member stays in (no ejection), so every "failed over" request fails over
            gw = start_gateway(stack, backends, extra="failover: {eject_after: 1000}", src=src)
            targets[name] = (gw.port, stack.procs[-1].pid, gw.pids[0])
        for port, _, _ in targets.values():  # warm: connections, caches
            for model in KINDS.values():
                for _ in range(20):
                    post(port, model)
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for name, (port, envoy, sidecar) in targets.items():
                for kind, model in KINDS.items():
                    s0, e0 = cpu_seconds((sidecar,)), cpu_seconds((envoy,))
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        post(port, model)
                        times[name, kind].append((time.perf_counter() - t0) * 1000)
                    cpu[name, kind][0] += cpu_seconds((sidecar,)) - s0
                    cpu[name, kind][1] += cpu_seconds((envoy,)) - e0
    finally:
        stack.stop()
        for server in (ok, second, failing):
            server.close()
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    for key, took in times.items():
        results[key] = (statistics.median(took), cpu[key][0] * 1000 / len(took), cpu[key][1] * 1000 / len(took))
    print(f"{'variant':12s} {'kind':14s} {'median ms':>10s} {'sidecar CPU ms/req':>19s} {'Envoy CPU ms/req':>17s} "
          f"{'both':>7s}")
    for (name, kind), (med, side, proxy) in results.items():
        print(f"{name:12s} {kind:14s} {med:10.2f} {side:19.3f} {proxy:17.3f} {side + proxy:7.3f}")
    print(f"\nadded to '{BASELINE}' (the same variant, the same rounds): CPU ms per request (sidecar + Envoy), "
          "median ms")
    for name, _ in variants:
        base_med, base_side, base_envoy = results[name, BASELINE]
        for kind in KINDS:
            if kind != BASELINE:
                med, side, proxy = results[name, kind]
                ratio = f"x{(side + proxy) / (base_side + base_envoy):.2f}" if base_side + base_envoy else "x-"
                print(f"{name:12s} {kind:14s} {side + proxy - base_side - base_envoy:+8.3f} CPU ms ({ratio}) "
                      f"{med - base_med:+8.2f} ms")
    return results


if __name__ == "__main__":
    main()
