"""A tiny chat-only OpenAI-compatible backend, so the local stack and `docker compose up` answer at once.

It echoes the last user message, streams word by word when asked, and reports usage. Like most
self-hosted servers it only speaks /v1/chat/completions: Responses clients reach it through the
sidecar's translation.
"""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JSONHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler with JSON and SSE helpers (shared with the test upstreams)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do: small SSE writes must not wait for ACKs
    raw_body = b""

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def handle_one_request(self) -> None:
        """A peer (Envoy's connection pool) that resets an idle keep-alive connection has closed it: not an
        error to print a traceback for. A reset mid-answer still fails the request at the client."""
        try:
            super().handle_one_request()
        except ConnectionResetError:
            self.close_connection = True

    def read_json(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.raw_body = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    return ""


class DemoHandler(JSONHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/v1/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": "demo", "object": "model", "created": 0, "owned_by": "demo"}]})
        else:
            self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                           "param": None, "code": None}})

    def do_POST(self) -> None:
        body = self.read_json()
        if self.path != "/v1/chat/completions" or not isinstance(body, dict):
            self.send_json(404, {"error": {"message": f"{self.path} is not served here: this backend only "
                                           "speaks /v1/chat/completions", "type": "invalid_request_error",
                                           "param": None, "code": None}})
            return
        messages = body.get("messages") or []
        text = f"You said: {_last_user_text(messages)}"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                 "total_tokens": prompt_tokens + len(text.split())}
        cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), body.get("model", "demo")
        if not body.get("stream"):
            self.send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": usage})
            return
        self.start_sse()
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        words = text.split(" ")
        deltas = [{"role": "assistant", "content": ""}] + [{"content": (" " if i else "") + w} for i, w in enumerate(words)]
        for d in deltas:
            self.send_chunk(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}).encode() + b"\n\n")
        self.send_chunk(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            self.send_chunk(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        self.send_chunk(b"data: [DONE]\n\n")
        self.end_chunks()


def serve(host: str, port: int) -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((host, port), DemoHandler).serve_forever()
