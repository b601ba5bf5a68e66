"""A fast streaming chat backend for the benchmarks (asyncio, one process).

POST /v1/chat/completions streams `max_completion_tokens` (or `max_tokens`) chunks, one every
`x-bench-interval-ms` milliseconds (each gap drawn uniformly within `x-bench-jitter-ms` of it, as a
model's tokens come: not on a clock shared by every stream); each chunk's text is the time it was written
(`time.monotonic_ns()`, the same clock in every process), so a client can measure how long each chunk
took to reach it. Non-streaming requests get one short answer.

    python benchmarks/stream_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def sse(doc: dict) -> bytes:
    data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            body = json.loads(await reader.readexactly(int(headers.get(b"content-length", b"0"))))
            n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 200)
            interval = float(headers.get(b"x-bench-interval-ms", b"0")) / 1000
            jitter = min(interval, float(headers.get(b"x-bench-jitter-ms", b"0")) / 1000)
            base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                    "model": body.get("model", "bench")}
            if not body.get("stream"):
                out = json.dumps({**base, "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(out)).encode() + b"\r\n\r\n" + out)
                await writer.drain()
                continue
            writer.write(HEAD + sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]}))
            for _ in range(n):
                if interval:
                    await asyncio.sleep(interval + random.uniform(-jitter, jitter) if jitter else interval)
                writer.write(sse({**base, "choices": [{"index": 0, "delta": {"content": f"{time.monotonic_ns()}|"},
                                                       "finish_reason": None}]}))
                await writer.drain()
            writer.write(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                writer.write(sse({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n,
                                                                   "total_tokens": n + 5}}))
            data = b"data: [DONE]\n\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
