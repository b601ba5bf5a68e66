"""A tiny OpenAI-compatible backend, so the local stack and `docker compose up` answer at once.

It echoes the last user message, streams word by word when asked, and reports usage; offered function
tools, it calls the first one (each required argument the user's text), as a model would, so tool-call
translation shows too. It serves two
models that each speak one API, so both directions of the sidecar's translation show: `demo` only
answers on /v1/chat/completions (like most self-hosted servers: Responses clients reach it through the
sidecar), `demo-codex` only on /v1/responses (like the Codex models: Chat clients reach it through
the sidecar).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extproc.api import API_OF_PATH, CHAT, COMPACT_PATH, PATHS, RESPONSES
from extproc.errors import GatewayError
from extproc.state.records import input_items
from extproc.translate import req_responses_to_chat, resp_chat_to_responses
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream


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


def _tool_call(messages: list[dict[str, Any]], tools: list[dict[str, Any]], said: str) -> dict[str, Any] | None:
    """A call of the first function tool when the user spoke last (a tool's result gets the echo)."""
    function = next((t.get("function") for t in tools if isinstance(t, dict) and t.get("type") == "function"), None)
    if not isinstance(function, dict) or not messages or messages[-1].get("role") != "user":
        return None
    required = (function.get("parameters") or {}).get("required") or []
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": function.get("name"), "arguments": json.dumps({k: said for k in required})}}


def _error(message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


_SEALED = "demo-compaction:"  # the demo's own compaction content: the earlier conversation, base64


def _compacted(body: dict[str, Any]) -> dict[str, Any]:
    """`/v1/responses/compact`: the user messages, then one compaction item holding the conversation."""
    items = input_items(body.get("input"))
    said = [f"{i.get('role')}: {' '.join(p.get('text', '') for p in i.get('content') or [] if isinstance(p, dict))}"
            for i in items if i["type"] == "message"]
    sealed = _SEALED + base64.b64encode("\n".join(said).encode()).decode()
    tokens = sum(len(line.split()) for line in said)
    return {"id": "cmp_" + uuid.uuid4().hex, "object": "response.compaction", "created_at": int(time.time()),
            "output": [*(i for i in items if i["type"] == "message" and i.get("role") == "user"),
                       {"id": "cmp_" + uuid.uuid4().hex, "type": "compaction", "encrypted_content": sealed}],
            "usage": {"input_tokens": tokens, "output_tokens": 1, "total_tokens": tokens + 1,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}


def _opened(inp: Any) -> Any:
    """A turn's input with the demo's own compaction items read back as the summary they hold."""
    if not isinstance(inp, list):
        return inp
    return [{"role": "user", "content": "Summary of the earlier conversation: "
                                        + base64.b64decode(item["encrypted_content"][len(_SEALED):]).decode()}
            if isinstance(item, dict) and item.get("type") == "compaction"
            and str(item.get("encrypted_content", "")).startswith(_SEALED) else item for item in inp]


class _Answer:
    """The echo answer to a list of chat messages, as a chat.completion or its chunk stream."""

    def __init__(self, messages: list[dict[str, Any]], model: str, tools: list[dict[str, Any]] | None = None):
        said = _last_user_text(messages)
        self.text = f"You said: {said}"
        self.call = _tool_call(messages, tools or [], said)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        out = len(self.text.split())
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}
        self.base = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": model}

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message the history keeps: the echo, or the tool call."""
        if self.call is None:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": None, "tool_calls": [self.call]}

    def completion(self) -> dict[str, Any]:
        return {**self.base, "object": "chat.completion", "usage": self.usage,
                "choices": [{"index": 0, "finish_reason": "stop" if self.call is None else "tool_calls",
                             "logprobs": None, "message": self.message}]}

    def chunks(self, include_usage: bool) -> list[bytes]:
        """The SSE events of the streamed answer: role, one delta per word (or the call, then its arguments
        in two pieces), finish, usage, [DONE]."""
        base = {**self.base, "object": "chat.completion.chunk"}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if self.call is None:
            deltas += [{"content": (" " if i else "") + w} for i, w in enumerate(self.text.split(" "))]
        else:
            args = self.call["function"]["arguments"]
            deltas.append({"tool_calls": [{"index": 0, "id": self.call["id"], "type": "function",
                                           "function": {"name": self.call["function"]["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                       for piece in (args[:len(args) // 2], args[len(args) // 2:])]
        docs = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        docs.append({**base, "choices": [{"index": 0, "delta": {},
                                          "finish_reason": "stop" if self.call is None else "tool_calls"}]})
        if include_usage:
            docs.append({**base, "choices": [], "usage": self.usage})
        return [b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs] + [b"data: [DONE]\n\n"]


class DemoHandler(JSONHandler):
    """`demo` answers only on /v1/chat/completions (like vLLM); `demo-codex` only on /v1/responses
    (like the Codex models), and both reject the other API the way OpenAI does."""

    server: DemoServer

    def do_GET(self) -> None:
        stored = self.server.history.get(self.path.removeprefix("/v1/responses/"))
        if self.path.startswith("/v1/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "demo"} for name in MODELS]})
        elif stored is not None:
            self.send_json(200, stored[1])
        else:
            self.send_json(404, _error("not found"))

    def do_POST(self) -> None:
        body = self.read_json()
        path = self.path.partition("?")[0]
        api = RESPONSES if path == COMPACT_PATH else API_OF_PATH.get(path)
        if api is None or not isinstance(body, dict):
            self.send_json(404, _error(f"{self.path} is not served here"))
            return
        model = body.get("model")
        if model not in MODELS:
            self.send_json(404, _error(f"The model '{model}' does not exist", "model_not_found", "model"))
        elif MODELS[model] != api:
            self.send_json(400, _error(f"The model '{model}' is only supported in {PATHS[MODELS[model]].lstrip('/')}; "
                                       f"it is not supported on {path}", "unsupported_api", "model"))
        elif api == CHAT:
            self.answer_chat(body)
        elif path == COMPACT_PATH:
            try:
                self.send_json(200, _compacted(body))
            except GatewayError as e:
                self.send_json(e.status, {"error": e.payload()})
        else:
            self.answer_responses({**body, "input": _opened(body["input"])} if "input" in body else body)

    def answer_chat(self, body: dict[str, Any]) -> None:
        answer = _Answer(body.get("messages") or [], body["model"], body.get("tools"))
        if not body.get("stream"):
            self.send_json(200, answer.completion())
            return
        self.start_sse()
        for chunk in answer.chunks(bool((body.get("stream_options") or {}).get("include_usage"))):
            self.send_chunk(chunk)
        self.end_chunks()

    def answer_responses(self, body: dict[str, Any]) -> None:
        """A Responses model that keeps its own conversations (previous_response_id), as OpenAI does.
        The answer is the chat echo put in Responses form by the sidecar's own translators."""
        prev = body.get("previous_response_id")
        stored = self.server.history.get(prev) if isinstance(prev, str) else None
        if prev is not None and stored is None:
            self.send_json(404, _error(f"Previous response with id '{prev}' not found.", "previous_response_not_found",
                                       "previous_response_id"))
            return
        try:
            chat = req_responses_to_chat.translate_request({k: v for k, v in body.items() if k != "previous_response_id"})
        except GatewayError as e:
            self.send_json(e.status, {"error": e.payload()})
            return
        messages = (stored[0] if stored else []) + chat["messages"]
        answer = _Answer(messages, body["model"], chat.get("tools"))
        if not body.get("stream"):
            resp = resp_chat_to_responses.translate_response(answer.completion(), body)
        else:
            self.start_sse()
            stream = ChatToResponsesStream(body)
            for out in [*map(stream.feed, answer.chunks(include_usage=True)), stream.close()]:
                if out:  # an empty chunk would end the chunked body
                    self.send_chunk(out)
            self.end_chunks()
            resp = stream.response
        if resp is not None and body.get("store") is not False:
            self.server.remember(resp, [*messages, answer.message])
        if not body.get("stream"):
            self.send_json(200, resp)


MODELS = {"demo": CHAT, "demo-codex": RESPONSES}


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    MAX_CONVERSATIONS = 10_000  # a bound, not an LRU: the demo forgets the oldest

    def __init__(self, address: tuple[str, int]):
        super().__init__(address, DemoHandler)
        self.history: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}  # id -> (messages, response)
        self.lock = threading.Lock()

    def remember(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        with self.lock:
            if len(self.history) >= self.MAX_CONVERSATIONS:
                self.history.pop(next(iter(self.history)))
            self.history[response["id"]] = (messages, response)


def serve(host: str, port: int) -> None:
    DemoServer((host, port)).serve_forever()
