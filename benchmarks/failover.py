"""What failover costs, each variant against the others in the same run, interleaved (A, B, C, A, B, C...).

Three Responses requests on chat-only backends (translated), through the real Envoy with
deploy/envoy.yaml and the sidecar:

- alone: a model one backend serves (today's path, which a model outside any group keeps);
- grouped, first member answers: a model of a group whose first member serves it;
- grouped, failed over: a model whose first member always answers 503, served by the second.

For each: median latency, and the sidecar's and Envoy's CPU time per request (user + system, from
/proc), which a shared machine's load disturbs far less than throughput.

    .venv/bin/python benchmarks/failover.py [--n 300] [--rounds 6]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.local.stack import Stack, free_port, wait_for_port
from tests.upstreams import ChatServer, Reply

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def post(port: int, body: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/responses", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200, data[:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="requests per variant")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    ok, second, failing = ChatServer(), ChatServer(), ChatServer()
    failing.next_reply = lambda echo: Reply(error=(503, {"error": {"message": "overloaded", "type": "server_error",
                                                                  "param": None, "code": None}}))
    stack = Stack()
    variants = {"alone": "solo", "grouped, first member answers": "grouped", "grouped, failed over": "failing"}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [0.0, 0.0] for v in variants}
    try:
        extproc_port, port = free_port(), free_port()
        cfg = stack.workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{extproc_port}", "admin_listen": "off", "websocket_listen": "off",
            "log_level": "warning", "failover": {"eject_after": 1000},  # the failing member stays in
            "backends": [
                {"name": "alone", "api": "chat", "models": ["solo"], "endpoints": [ok.address]},
                {"name": "first", "api": "chat", "models": ["grouped"], "endpoints": [ok.address]},
                {"name": "broken", "api": "chat", "models": ["failing"], "endpoints": [failing.address]},
                {"name": "second", "api": "chat", "models": ["grouped", "failing"], "endpoints": [second.address]}]}))
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(extproc_port, proc=sidecar)
        envoy = stack.start_envoy(port, free_port(), extproc_port)
        for model in variants.values():  # warm: connections, caches
            for _ in range(20):
                post(port, {"model": model, "input": "hi"})
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for name, model in variants.items():
                s0, e0 = cpu_seconds(sidecar.pid), cpu_seconds(envoy.pid)
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    post(port, {"model": model, "input": "hi"})
                    times[name].append((time.perf_counter() - t0) * 1000)
                cpu[name][0] += cpu_seconds(sidecar.pid) - s0
                cpu[name][1] += cpu_seconds(envoy.pid) - e0
    finally:
        stack.stop()
        for server in (ok, second, failing):
            server.close()
    base = statistics.median(times["alone"])
    print(f"{'variant':32s} {'median ms':>10s} {'vs alone':>9s} {'sidecar CPU ms/req':>19s} {'Envoy CPU ms/req':>17s}")
    for name in variants:
        n = len(times[name])
        med = statistics.median(times[name])
        print(f"{name:32s} {med:10.2f} {med / base:9.2f} {cpu[name][0] * 1000 / n:19.3f} {cpu[name][1] * 1000 / n:17.3f}")


if __name__ == "__main__":
    main()
