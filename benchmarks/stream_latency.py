"""Added time per streamed chunk: Envoy alone vs Envoy + sidecar (pass-through and translated).

Starts, on loopback, the demo chat backend, a Responses-only test upstream, Envoy alone (the repo's
deploy/envoy.yaml without the ext_proc filter), and Envoy with the sidecar. Each round sends one
streamed request per case, interleaved so machine noise hits every case alike, and reads the SSE
stream to its end. Reports medians and, per case, the added time per chunk against Envoy alone.

    .venv/bin/python benchmarks/stream_latency.py [--rounds 40] [--words 200]

Prints a table and writes benchmarks/results/stream_latency.json. Numbers vary with the machine;
compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import envoy_alone_config  # noqa: E402

from extproc.local.stack import Stack, find_envoy, free_port, wait_for_envoy, wait_for_port  # noqa: E402
from tests.upstreams import Reply, ResponsesServer  # noqa: E402

SIDECAR_CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
log_level: warning
backends:
  - name: demo
    api: chat
    models: ["demo"]
    endpoints: ["127.0.0.1:{demo_port}"]
  - name: codex
    api: responses
    models: ["gpt-5.3-codex"]
    endpoints: ["{resp}"]
"""


def stream_once(conn: http.client.HTTPConnection, path: str, body: dict, headers: dict[str, str]) -> tuple[float, float, int]:
    """(seconds to first byte, seconds to end of stream, SSE events received)."""
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, payload, {"content-type": "application/json", **headers})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{path}: {resp.status} {resp.read()[:300]!r}")
    first = None
    events = 0
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter() - t0
        buf += chunk
        events += buf.count(b"\n\n")
        buf = buf[buf.rfind(b"\n\n") + 2:] if b"\n\n" in buf else buf
    return first or 0.0, time.perf_counter() - t0, events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--words", type=int, default=200, help="words (chat chunks) per streamed answer")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream_latency.json"))
    args = ap.parse_args()

    text = " ".join(f"w{i}" for i in range(args.words))
    resp_up = ResponsesServer()
    stack = Stack()
    try:
        demo_port, extproc_port = free_port(), free_port()
        demo = stack.spawn("demo", [sys.executable, "-m", "extproc", "demo-backend", "--port", str(demo_port)])
        wait_for_port(demo_port, proc=demo)
        cfg = stack.workdir / "config.yaml"
        cfg.write_text(SIDECAR_CONFIG.format(extproc_port=extproc_port, admin_port=free_port(), demo_port=demo_port, resp=resp_up.address))
        wait_for_port(extproc_port, proc=stack.start_sidecar(cfg))
        gw_port, alone_port = free_port(), free_port()
        stack.start_envoy(gw_port, free_port(), extproc_port)
        alone_admin = free_port()
        alone_cfg = stack.workdir / "envoy-alone.yaml"
        alone_cfg.write_text(envoy_alone_config(alone_port, alone_admin))
        stack.spawn("envoy-alone", [find_envoy(), "-c", str(alone_cfg), "--log-level", "warn", "--base-id",
                                    str(alone_port), "--concurrency", "2", "--disable-hot-restart"])
        wait_for_envoy(alone_admin)

        chat_req = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": text}]}
        resp_req = {"model": "demo", "stream": True, "input": text}
        codex_req = {"model": "gpt-5.3-codex", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        codex_input = {"model": "gpt-5.3-codex", "input": "hi"}
        codex_pieces = args.words  # the Responses upstream streams its text in this many deltas
        cases = {
            "envoy alone (chat)": (alone_port, "/v1/chat/completions", chat_req,
                                   {"x-gateway-destination-endpoint": f"127.0.0.1:{demo_port}"}),
            "sidecar, pass-through (chat)": (gw_port, "/v1/chat/completions", chat_req, {}),
            "sidecar, chat upstream -> Responses client": (gw_port, "/v1/responses", resp_req, {}),
            "envoy alone (responses)": (alone_port, "/v1/responses", {**codex_input, "stream": True},
                                        {"x-gateway-destination-endpoint": resp_up.address}),
            "sidecar, pass-through (responses)": (gw_port, "/v1/responses", {**codex_input, "stream": True}, {}),
            "sidecar, Responses upstream -> chat client": (gw_port, "/v1/chat/completions", codex_req, {}),
        }
        conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for name, (port, *_) in cases.items()}
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cases}
        for i in range(args.rounds + 3):  # three warm-up rounds
            for name, (_port, path, body, headers) in cases.items():
                if body["model"] == "gpt-5.3-codex":
                    resp_up.script.append(Reply(text=text, pieces=codex_pieces))
                r = stream_once(conns[name], path, body, headers)
                if i >= 3:
                    samples[name].append(r)
    finally:
        stack.stop()
        resp_up.close()

    rows = []
    for name, ss in samples.items():
        # Each case against Envoy alone in front of the same upstream.
        base = samples["envoy alone (responses)" if "Responses upstream" in name or "(responses)" in name
                       else "envoy alone (chat)"]
        base_total = statistics.median(s[1] for s in base)
        base_chunks = statistics.median(s[2] for s in base)
        base_body = statistics.median(s[1] - s[0] for s in base)
        ttfb = statistics.median(s[0] for s in ss)
        total = statistics.median(s[1] for s in ss)
        body = statistics.median(s[1] - s[0] for s in ss)
        rows.append({"case": name, "ttfb_ms": ttfb * 1e3, "total_ms": total * 1e3,
                     "events": statistics.median(s[2] for s in ss),
                     "ratio_vs_envoy_alone": total / base_total,
                     "added_ms_to_first_byte": (ttfb - statistics.median(s[0] for s in base)) * 1e3,
                     "added_us_per_upstream_chunk": (body - base_body) / base_chunks * 1e6})
    print(f"{args.rounds} rounds, answers of {args.words} text deltas, medians; each case against Envoy alone "
          "in front of the same upstream\n")
    print(f"{'case':44} {'ttfb ms':>8} {'total ms':>9} {'events':>7} {'x alone':>8} {'+ms ttfb':>9} {'+us/chunk':>10}")
    for r in rows:
        print(f"{r['case']:44} {r['ttfb_ms']:8.2f} {r['total_ms']:9.2f} {r['events']:7.0f} "
              f"{r['ratio_vs_envoy_alone']:8.2f} {r['added_ms_to_first_byte']:9.2f} {r['added_us_per_upstream_chunk']:10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "words": args.words, "results": rows}, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
