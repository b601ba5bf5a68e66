"""What the protocol surface costs, each against a baseline measured in the same run.

- First contact: a request to a model of unknown API that the upstream rejects and the gateway
  retries on the other API, against the same request once the API is learned (one translated trip).
- WebSocket mode: one `response.create` turn over an open socket, against the same streaming
  request over HTTP (both through the real Envoy with deploy/envoy.yaml and the sidecar).

    .venv/bin/python benchmarks/surface.py [--n 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.sync.client import connect

from extproc.local.stack import Stack, free_port, wait_for_port
from tests.upstreams import ChatServer


def post(port: int, path: str, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200, data[:300]
    return data


def timed(f, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        f(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def ws_turn(ws, model: str) -> None:
    ws.send(json.dumps({"type": "response.create", "model": model, "input": "hi"}))
    while json.loads(ws.recv(timeout=30))["type"] not in ("response.completed", "response.failed", "error"):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    n = ap.parse_args().n
    chat = ChatServer()
    stack = Stack()
    try:
        extproc_port, port, ws_port = free_port(), free_port(), free_port()
        cfg = stack.workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{extproc_port}", "admin_listen": "off", "log_level": "warning",
            "websocket_listen": f"127.0.0.1:{ws_port}", "websocket_gateway": f"http://127.0.0.1:{port}",
            "backends": [{"name": "auto", "api": "auto", "models": ["*"], "endpoints": [chat.address]}]}))
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(extproc_port, proc=sidecar)
        stack.start_envoy(port, free_port(), extproc_port, websocket_port=ws_port)
        req = {"input": "hi"}
        post(port, "/v1/responses", {**req, "model": "warm"})
        first = timed(lambda i: post(port, "/v1/responses", {**req, "model": f"new-{i}"}), n)
        learned = timed(lambda i: post(port, "/v1/responses", {**req, "model": "warm"}), n)
        http_stream = timed(lambda i: post(port, "/v1/responses", {**req, "model": "warm", "stream": True}), n)
        with connect(f"ws://127.0.0.1:{port}/v1/responses") as ws:
            socket_turn = timed(lambda i: ws_turn(ws, "warm"), n)
    finally:
        stack.stop()
        chat.close()
    rows = [("first contact (rejected, retried, translated)", first, learned, "learned, translated"),
            ("WebSocket turn (response.create -> events)", socket_turn, http_stream, "HTTP streaming request")]
    for name, m, base, base_name in rows:
        med, bmed = statistics.median(m), statistics.median(base)
        print(f"{name:48s} median {med:6.2f} ms  vs {base_name} {bmed:6.2f} ms  ratio {med / bmed:4.2f}")


if __name__ == "__main__":
    main()
