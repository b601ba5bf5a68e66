"""Soak: mixed traffic through the real stack for a set time; errors, lost conversations, memory.

Both APIs, streamed and not, translated and passed through, and multi-turn pinned conversations
(previous_response_id) on a three-instance stateful Responses backend and on a chat backend whose
conversations the sidecar keeps. Samples the sidecar's RSS every 10 s.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--clients 8] [--store-mib 32]

Prints a line per sample and a summary; writes benchmarks/results/soak.json. Exit 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time

from common import REPO, Stack, rss_mb, start_gateway

sys.path.insert(0, str(REPO))
import openai

from tests.upstreams import ChatServer, ResponsesServer


def worker(url: str, stop: threading.Event, stats: dict, lock: threading.Lock, seed: int) -> None:
    rnd = random.Random(seed)
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
    convs = {"gpt-oss-soak": None, "llama-soak": None}
    while not stop.is_set():
        kind = rnd.choice(["chat", "chat-stream", "resp", "resp-stream", "turn", "turn"])
        model = rnd.choice(["gpt-oss-soak", "llama-soak"])
        try:
            if kind == "chat":
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            elif kind == "chat-stream":
                for _ in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True, stream_options={"include_usage": True}):
                    pass
            elif kind == "resp":
                client.responses.create(model=model, input="hi")
            elif kind == "resp-stream":
                with client.responses.stream(model=model, input="hi") as s:
                    s.get_final_response()
            else:  # the next turn of this worker's conversation on that model
                prev = convs[model]
                kw = {"previous_response_id": prev} if prev else {}
                r = client.responses.create(model=model, input=f"turn {rnd.random()}", **kw)
                convs[model] = r.id if rnd.random() > 0.05 else None  # now and then a new conversation
                with lock:
                    stats["turns"] += 1
            with lock:
                stats["ok"] += 1
        except openai.NotFoundError as e:
            with lock:
                stats["lost_conversations" if "previous_response" in str(e) else "errors"] += 1
                stats["last_error"] = str(e)[:300]
        except Exception as e:  # every failure counts, whatever it is
            with lock:
                stats["errors"] += 1
                stats["last_error"] = f"{type(e).__name__}: {e}"[:300]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--store-mib", type=int, default=32,
                    help="state.max_memory_bytes of the sidecar's memory store, in MiB (32 is the default): RSS "
                         "rises while the store fills to it, then stays flat")
    args = ap.parse_args()
    resp = [ResponsesServer() for _ in range(3)]
    chat = ChatServer()
    stack = Stack()
    stats = {"ok": 0, "errors": 0, "lost_conversations": 0, "turns": 0, "last_error": None}
    samples: list[tuple[float, float, int]] = []
    try:
        gateway = start_gateway(stack, f"""
- name: stateful
  api: responses
  models: ["gpt-oss-*"]
  endpoints: [{", ".join(f'"{s.address}"' for s in resp)}]
- name: chat
  api: chat
  models: ["llama-*"]
  endpoints: ["{chat.address}"]
""", extra=f"state: {{max_memory_bytes: {args.store_mib * 1024 * 1024}}}")
        port, sidecar = gateway.port, gateway.pids[0]
        stop, lock = threading.Event(), threading.Lock()
        threads = [threading.Thread(target=worker, args=(f"http://127.0.0.1:{port}", stop, stats, lock, i), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(10, max(0.1, end - time.monotonic())))
            with lock:
                samples.append((round(time.monotonic() - t0), rss_mb(sidecar), stats["ok"]))
                print(f"t={samples[-1][0]:>5}s rss={samples[-1][1]:.1f} MB ok={stats['ok']} errors={stats['errors']} "
                      f"lost={stats['lost_conversations']}", flush=True)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        stack.stop()
        for s in [*resp, chat]:
            s.close()
    first_minute = [rss for t, rss, _ in samples if t <= 60] or [samples[0][1]]
    summary = {"minutes": args.minutes, "clients": args.clients, "store_mib": args.store_mib, **stats,
               "rss_mb_after_1_min": max(first_minute), "rss_mb_end": samples[-1][1],
               "rss_mb_max": max(rss for _, rss, _ in samples), "samples": samples}
    out = REPO / "benchmarks" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    return 0 if stats["errors"] == 0 and stats["lost_conversations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
