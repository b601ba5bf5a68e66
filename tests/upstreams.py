"""Test upstreams that behave like real providers: strict about what they accept, scripted in what they say.

- `ChatServer`: a chat-only server (vLLM / Ollama style). 404 on /v1/responses, 400 on any field the
  Chat Completions API does not define, and on tool messages that answer no earlier call.
- `ResponsesServer`: a Responses-only server (Codex-model style). 400 "use /v1/responses" on
  /v1/chat/completions, 400 on `messages` or any field the Responses API does not define. Stateful
  like a vLLM instance: it only knows the response ids it produced itself (404 otherwise), for
  `previous_response_id` and GET/DELETE/cancel/input_items. A `compaction_trigger` last in `input` is
  answered with one opaque compaction item (elsewhere: 400, as OpenAI). The Conversations API as
  OpenAI's reference has it (`/v1/conversations[/{id}[/items[/{item_id}]]]`, strict about fields,
  limits and ids; 404 for another instance's conversation), and `conversation` on a turn: its items are
  the turn's context, the turn's input and output appended.
- `MessagesServer`: an Anthropic-compatible server. 404 on every path but /v1/messages, 400 in
  Anthropic's error shape on unknown fields, turns that do not alternate, tool results that answer
  no earlier tool_use, and thinking blocks without a signature it made; `x-api-key` checked.

Each reply is taken from `script` (a queue of `Reply`), else an echo of the last user text.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from extproc.local.demo_backend import JSONHandler

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "reasoning_effort",
    "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity", "modalities",
}
COMPACTED = "opaque-backend-compaction-"  # this server's own compaction items
RESPONSES_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "stream", "stream_options", "store", "metadata", "user",
    "previous_response_id", "include", "truncation", "service_tier", "prompt_cache_key", "safety_identifier",
    "top_logprobs", "background", "max_tool_calls", "conversation",
}


@dataclass
class Reply:
    text: str | None = "ok"
    reasoning: str | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, JSON arguments)
    finish: str = "stop"  # stop | length | content_filter (tool_calls is implied by calls)
    error: tuple[int, Any] | None = None  # (status, JSON body) instead of an answer
    cut: bool = False  # a stream that stops before its finish
    # With cut: the connection drops instead, without the last chunk (a crashed provider), once this is set
    # (the test sets it when its client has seen the stream start; at most 30 s). With reset: the headers
    # are sent, and the connection drops once this is set.
    drop: threading.Event | None = None
    usage: bool = True
    gzip: bool = False  # compress the answer even though the request asked for identity
    content_encoding: str = "gzip"  # the label it gets: another one makes bytes the sidecar cannot read
    pieces: int = 3  # deltas per streamed text
    delay: float = 0.0  # seconds between streamed text deltas (a slow model)
    stall: float = 0.0  # seconds to wait before answering at all (a stuck model)
    hold: threading.Event | None = None  # a stream waits after its first chunk, a chat answer before it is
    # sent, until this is set (at most 30 s)
    # A broken provider: `body` is sent as a 200 JSON answer whatever it holds (b"" for no body at
    # all); `events` are the SSE data payloads of a 200 stream, sent as they are, then the stream ends.
    body: bytes | None = None
    events: list[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # sent with the answer (an echo, a `location`)
    reset: bool = False  # a crashing server: a 200's headers sent, then the connection dropped before any body
    silent: threading.Event | None = None  # a stuck server: the request read, nothing sent until this is set
    # (at most 30 s), then the connection dropped
    model: str | None = None  # the model the answer names (a provider's dated snapshot), else the request's


def _err(message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _pieces(text: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class _Server:
    handler: type[JSONHandler]

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[dict[str, Any]] = []
        self.conns: set[socket.socket] = set()
        server_self = self

        class Handler(self.handler):  # type: ignore[name-defined,misc]
            upstream = server_self

            def setup(self) -> None:
                super().setup()
                server_self.conns.add(self.connection)

            def finish(self) -> None:
                server_self.conns.discard(self.connection)
                super().finish()

        ThreadingHTTPServer.daemon_threads = True
        # a provider's listen backlog, not http.server's 5: a burst of new connections is not dropped to
        # come back on a SYN retry seconds later
        ThreadingHTTPServer.request_queue_size = 1024
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # HTTPS only, like a hosted provider
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def next_reply(self, echo: str) -> Reply:
        return self.script.popleft() if self.script else Reply(text=f"echo: {echo}")

    def reset(self) -> None:
        self.script.clear()
        self.requests.clear()

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]

    def close(self) -> None:
        """Stop like a crashed instance: no listener, open keep-alive connections cut."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in list(self.conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(JSONHandler):
    """Sends gzip when the reply says so, as some proxies in front of real servers do."""

    gz: Any = None
    encoding_label = "gzip"

    def reply_for(self, echo: str) -> Reply:
        reply = self.upstream.next_reply(echo)
        if reply.stall:
            time.sleep(reply.stall)
        self.gz = zlib.compressobj(wbits=31) if reply.gzip else None
        self.encoding_label = reply.content_encoding
        return reply

    def send_failure(self, reply: Reply, stream: bool) -> bool:
        """Send the reply's scripted failure, if it is one (an error, a reset, silence, a broken
        answer), the same way on either API."""
        if reply.error:
            self.send_json(*reply.error, reply.headers)
        elif reply.reset:
            self.send_reset(stream, reply.drop)
        elif reply.silent is not None:
            self.say_nothing(reply.silent)
        else:
            return self.send_broken(reply, stream)
        return True

    def send_broken(self, reply: Reply, stream: bool) -> bool:
        """Send the reply's broken answer, if it has one for this kind of request."""
        if stream and reply.events is not None:
            self.start_sse()
            for data in reply.events:
                self.send_chunk(b"data: " + data + b"\n\n")
            self.end_chunks()
            return True
        if reply.body is None:
            return False
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply.body)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(reply.body)
        return True

    def send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        if self.gz is None:
            return super().send_json(status, doc, headers)
        body = self.gz.compress(json.dumps(doc).encode()) + self.gz.flush()
        self.send_response(status)
        for k, v in {"content-type": "application/json", "content-encoding": self.encoding_label,
                     "content-length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def start_sse(self) -> None:
        if self.gz is None:
            return super().start_sse()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-encoding", "gzip")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def send_chunk(self, data: bytes) -> None:
        super().send_chunk(self.gz.compress(data) + self.gz.flush(zlib.Z_SYNC_FLUSH) if self.gz else data)

    def end_chunks(self) -> None:
        if self.gz is not None:
            super().send_chunk(self.gz.flush())
        super().end_chunks()

    def send_reset(self, stream: bool, drop: threading.Event | None = None) -> None:
        """A 200's headers (a stream's, or a JSON answer's with its length), then the connection drops
        (once `drop` is set, when given)."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream" if stream else "application/json")
        self.send_header("transfer-encoding" if stream else "content-length", "chunked" if stream else "512")
        self.end_headers()
        self.wfile.flush()
        if drop is not None:
            drop.wait(timeout=30)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def say_nothing(self, until: threading.Event) -> None:
        """Accept the request and never answer it: the connection dropped once the test is done."""
        until.wait(timeout=30)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def stop(self, reply: Reply) -> None:
        """A stream cut short: ended properly, or (`drop`) the connection closed with the body unfinished."""
        if reply.drop is None:
            self.end_chunks()
            return
        self.wfile.flush()
        reply.drop.wait(timeout=30)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class _ChatHandler(_Handler):
    upstream: ChatServer

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": []})
            return
        self.upstream.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
        if self.path.startswith("/anything"):  # httpbin's echo of the request, as some debugging proxies have
            self.send_json(200, {"method": "GET", "url": self.path, "headers": dict(self.headers)})
        elif self.path.startswith("/v1/files"):  # an account's files, as a provider lists them for its key
            self.send_json(200, {"object": "list", "data": [{"id": "file-secret-training-data", "object": "file"}]})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = self.read_json()
        self.upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                       "raw": self.raw_body})
        if self.path == "/v1/embeddings":
            if self.upstream.script and self.send_broken(self.upstream.script.popleft(), stream=False):
                return  # a scripted answer, e.g. a batch too large for the gateway's buffers
            self.send_json(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                                 "model": body.get("model"), "usage": {"prompt_tokens": 1, "total_tokens": 1}})
            return
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"detail": "Not Found"})  # what vLLM says for /v1/responses
            return
        problem = self.check(body)
        if problem:
            self.send_json(400, {"object": "error", "message": problem, "type": "BadRequestError", "param": None,
                                 "code": 400})  # vLLM's error shape
            return
        last_user = next((m.get("content") for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        reply = self.reply_for(last_user if isinstance(last_user, str) else json.dumps(last_user))
        if self.send_failure(reply, bool(body.get("stream"))):
            return
        if body.get("stream"):
            self.chat_stream(body, reply)
        else:
            if reply.hold is not None:  # a slow model: the answer comes once the test lets it
                reply.hold.wait(timeout=30)
            self.send_json(200, self.completion(body, reply), reply.headers)

    def check(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be an object"
        extra = set(body) - CHAT_FIELDS
        if extra:
            return f"Unrecognized request argument supplied: {', '.join(sorted(extra))}"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        calls: set[str] = set()
        for m in messages:
            role = m.get("role")
            if role not in ("system", "user", "assistant", "tool", "developer"):
                return f"invalid role {role}"
            if role == "assistant":
                for c in m.get("tool_calls") or []:
                    if c.get("type") != "function" or not c.get("id") or "name" not in c.get("function", {}):
                        return "malformed tool call"
                    calls.add(c["id"])
            if role == "tool" and m.get("tool_call_id") not in calls:
                return f"tool message answers unknown call {m.get('tool_call_id')}"
            if role != "assistant" and not isinstance(m.get("content"), (str, list)):
                return f"{role} message needs content"
        return None

    def _usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 2}}

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.calls:
            message["tool_calls"] = [{"id": f"call_{i}_{uuid.uuid4().hex[:6]}", "type": "function",
                                      "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(reply.calls)]
        finish = "tool_calls" if reply.calls else reply.finish
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": reply.model or body["model"], "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                                     "logprobs": None}],
                "usage": self._usage() if reply.usage else None}

    def chat_stream(self, body: dict[str, Any], reply: Reply) -> None:
        self.start_sse()
        base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": reply.model or body["model"]}

        def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.send_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        send({"role": "assistant", "content": ""})
        if reply.hold is not None:
            reply.hold.wait(timeout=30)
        for piece in _pieces(reply.reasoning or "") if reply.reasoning else []:
            send({"reasoning_content": piece})
        for piece in _pieces(reply.text, reply.pieces if reply.delay == 0 else 20) if reply.text else []:
            time.sleep(reply.delay)
            send({"content": piece})
        ids = [f"call_{i}_{uuid.uuid4().hex[:6]}" for i in range(len(reply.calls))]
        for i, (name, _) in enumerate(reply.calls):  # all calls announced, then arguments interleaved
            send({"tool_calls": [{"index": i, "id": ids[i], "type": "function",
                                  "function": {"name": name, "arguments": ""}}]})
        pieces = [_pieces(args) for _, args in reply.calls]
        for j in range(max((len(p) for p in pieces), default=0)):
            for i, p in enumerate(pieces):
                if j < len(p):
                    send({"tool_calls": [{"index": i, "function": {"arguments": p[j]}}]})
        if reply.cut:
            self.stop(reply)
            return
        send({}, "tool_calls" if reply.calls else reply.finish)
        if (body.get("stream_options") or {}).get("include_usage") and reply.usage:
            self.send_chunk(b"data: " + json.dumps({**base, "choices": [], "usage": self._usage()}).encode() + b"\n\n")
        self.send_chunk(b"data: [DONE]\n\n")
        self.end_chunks()


class ChatServer(_Server):
    handler = _ChatHandler


class _ResponsesHandler(_Handler):
    upstream: ResponsesServer

    def _record(self, body: Any) -> None:
        self.upstream.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                       "body": body, "raw": self.raw_body})

    def _stored(self) -> tuple[str, str, dict[str, Any] | None]:
        rid, _, suffix = self.path.removeprefix("/v1/responses/").partition("?")[0].partition("/")
        return rid, suffix, self.upstream.visible(rid, self.headers.get("authorization"))

    def do_GET(self) -> None:
        self._record(None)
        if self.path.startswith("/v1/conversations"):
            self.conversations(None)
            return
        rid, suffix, stored = self._stored()
        query = parse_qs(self.path.partition("?")[2])
        if stored is None or suffix not in ("", "input_items"):
            self.send_json(404, _err(f"Response with id '{rid}' not found."))
        elif suffix == "" and query.get("stream") == ["true"]:  # a background stream resumed, as OpenAI's
            if "events" not in stored:
                self.send_json(400, _err("Only background responses created with stream=true can be streamed.",
                                         param="stream"))
                return
            after = int(query.get("starting_after", ["-1"])[0])
            self.start_sse()
            for seq, frame in stored["events"]:
                if seq > after:
                    self.send_chunk(frame)
            self.end_chunks()
        elif suffix == "" and stored["response"]["status"] in ("queued", "in_progress"):  # a background one runs
            final = stored["final"]  # queued, then in_progress, then done: one step per poll
            stored["response"] = final if stored["response"]["status"] == "in_progress" else \
                {**stored["response"], "status": "in_progress"}
            self.send_json(200, stored["response"])
        elif suffix == "input_items":
            items = stored["input"]
            self.send_json(200, {"object": "list", "data": items[::-1], "has_more": False,
                                 "first_id": items[-1]["id"], "last_id": items[0]["id"]})
        else:
            self.send_json(200, stored["response"])

    def do_DELETE(self) -> None:
        self._record(None)
        if self.path.startswith("/v1/conversations"):
            self.conversations(None)
            return
        rid, _, stored = self._stored()
        if stored is None:
            self.send_json(404, _err(f"Response with id '{rid}' not found."))
            return
        del self.upstream.stored[rid]
        self.send_json(200, {"id": rid, "object": "response", "deleted": True})

    def do_POST(self) -> None:
        body = self.read_json()
        self._record(body)
        if self.path.startswith("/v1/conversations"):
            self.conversations(body)
            return
        if self.path.startswith("/v1/responses/") and self.path.endswith("/cancel"):
            rid, _, stored = self._stored()
            if stored is not None and "final" in stored:  # background: an unfinished one becomes cancelled
                if stored["response"]["status"] in ("queued", "in_progress"):
                    stored["response"] = {**stored["response"], "status": "cancelled"}
                self.send_json(200, stored["response"])
                return
            self.send_json(404 if stored is None else 400, _err(
                f"Response with id '{rid}' not found." if stored is None else "Cannot cancel a synchronous response."))
            return
        if self.path == "/v1/chat/completions":
            self.send_json(400, _err("This model is only supported in v1/responses and not in v1/chat/completions.",
                                     "unsupported_api"))
            return
        if self.path == "/v1/responses/compact":
            if not self.upstream.compact_endpoint:  # as OpenAI answers it for some accounts
                self.send_json(404, {"error": {"message": "Invalid URL (POST /v1/responses/compact)",
                                               "type": "invalid_request_error", "param": None, "code": None}})
                return
            self.compact(body)
            return
        if self.path == "/v1/responses/input_tokens":  # as OpenAI's: a count of the request's input
            if self.upstream.script and self.upstream.script[0].error:  # an overloaded server refuses counts too
                self.send_json(*self.upstream.script.popleft().error)
                return
            self.send_json(200, {"object": "response.input_tokens", "input_tokens": len(str(body.get("input")).split())})
            return
        if self.path != "/v1/responses":
            self.send_json(404, _err("Not found"))
            return
        if self.refused(body, RESPONSES_FIELDS):
            return
        prev = body.get("previous_response_id")
        conversation = self.turn_conversation(body)
        if conversation is False:
            return
        calls = self.upstream.calls_before(prev) | _calls_in(conversation["items"] if conversation else [])
        problem = self.check_input(body.get("input"), calls)
        if problem:
            self.send_json(400, _err(problem, "invalid_value", "input"))
            return
        reply = self.reply_for(self.last_user(body.get("input")))
        if self.send_failure(reply, bool(body.get("stream"))):
            return
        response = self.response(body, reply)
        inp = body.get("input")
        if isinstance(inp, list) and inp and inp[-1].get("type") == "compaction_trigger":  # compaction, as OpenAI's
            response["output"] = [{"type": "compaction", "id": "cmp_" + uuid.uuid4().hex,
                                   "encrypted_content": COMPACTED + uuid.uuid4().hex}]
        if conversation:  # the turn's input and output join the conversation, as OpenAI's
            response["conversation"] = {"id": conversation["conversation"]["id"]}
            conversation["items"] += [*_with_ids(body.get("input")), *response["output"]]
        if body.get("store") is not False:
            inp = body.get("input")
            items = [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp)
            items = [{**it, "type": "message", "content": [{"type": "input_text", "text": it["content"]}]}
                     if isinstance(it.get("content"), str) else it for it in items]
            self.upstream.stored[response["id"]] = {
                "response": response, "input": [{"id": f"msg_{uuid.uuid4().hex}", **it} for it in items],
                "caller": self.headers.get("authorization")}
        if body.get("background") is True and not body.get("stream"):  # as OpenAI: queued now, polled to its end
            if body.get("store") is False:
                self.send_json(400, _err("Background responses must be stored.", "invalid_value", "store"))
                return
            queued = {**response, "status": "queued", "background": True, "output": [], "usage": None}
            self.upstream.stored[response["id"]].update(response=queued, final={**response, "background": True})
            self.send_json(200, queued)
            return
        if body.get("stream"):
            frames = self.responses_stream(response, reply)
            if body.get("background") is True and response["id"] in self.upstream.stored:  # resumable, as OpenAI's
                self.upstream.stored[response["id"]].update(events=frames, response={**response, "background": True})
        else:
            self.send_json(200, response)

    def turn_conversation(self, body: dict[str, Any]) -> dict[str, Any] | bool | None:
        """The conversation a turn names (None: none; False: refused, answered)."""
        value = body.get("conversation")
        if value is None:
            return None
        cid = value.get("id") if isinstance(value, dict) else value
        if body.get("previous_response_id") is not None:
            self.send_json(400, _err("Mutually exclusive parameters: 'previous_response_id' and 'conversation'.",
                                     "mutually_exclusive_parameters", "conversation"))
            return False
        held = self.upstream.conversation(cid, self.headers.get("authorization")) if isinstance(cid, str) else None
        if held is None:
            self.send_json(404, _err(f"Conversation with id '{cid}' not found.", "conversation_not_found",
                                     "conversation"))
            return False
        return held

    def conversations(self, body: Any) -> None:
        """OpenAI's Conversations API, strictly: each path's methods and fields, its limits, its shapes."""
        path, _, query = self.path.partition("?")
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        parts = path.removeprefix("/v1/conversations").strip("/").split("/") if path != "/v1/conversations" else []
        method = self.command
        if not parts:
            if method != "POST":
                return self.send_json(405, _err("Method not allowed"))
            if self.bad_fields(body, {"items", "metadata"}) or self.bad_items(body.get("items"), empty=True) \
                    or self.bad_metadata(body.get("metadata")):
                return None
            conv = {"id": "conv_" + uuid.uuid4().hex, "object": "conversation", "created_at": int(time.time()),
                    "metadata": body.get("metadata") or {}}
            self.upstream.conversations[conv["id"]] = {"conversation": conv, "caller": self.headers.get("authorization"),
                                                       "items": _with_ids(body.get("items") or [])}
            return self.send_json(200, conv)
        held = self.upstream.conversation(parts[0], self.headers.get("authorization"))
        if held is None or len(parts) > 3 or (len(parts) > 1 and parts[1] != "items"):
            return self.send_json(404, _err(f"Conversation with id '{parts[0]}' not found.", "conversation_not_found"))
        conv, items = held["conversation"], held["items"]
        if method not in (("GET", "POST", "DELETE"), ("GET", "POST"), ("GET", "DELETE"))[len(parts) - 1]:
            return self.send_json(405, _err("Method not allowed"))
        if len(parts) == 1:
            if method == "GET":
                return self.send_json(200, conv)
            if method == "DELETE":
                del self.upstream.conversations[conv["id"]]
                return self.send_json(200, {"id": conv["id"], "object": "conversation.deleted", "deleted": True})
            if self.bad_fields(body, {"metadata"}) or self.bad_metadata(body.get("metadata")):
                return None
            if "metadata" not in body:
                return self.send_json(400, _err("Missing required parameter: 'metadata'.", "missing_required_parameter",
                                                "metadata"))
            conv["metadata"] = body["metadata"]
            return self.send_json(200, conv)
        if len(parts) == 3:
            found = next((it for it in items if it["id"] == parts[2]), None)
            if found is None:
                return self.send_json(404, _err(f"Item with id '{parts[2]}' not found.", "item_not_found"))
            if method == "DELETE":
                items.remove(found)
                return self.send_json(200, conv)
            return self.send_json(200, found)
        if method == "POST":
            if self.bad_fields(body, {"items"}) or self.bad_items(body.get("items"), empty=False):
                return None
            added = _with_ids(body["items"])
            items += added
            return self.send_json(200, _page(added, False))
        order, after, limit = q.get("order", "desc"), q.get("after"), q.get("limit", "20")
        if order not in ("asc", "desc") or not limit.isdigit() or not 1 <= int(limit) <= 100:
            return self.send_json(400, _err("Invalid 'order' or 'limit'.", "invalid_value"))
        data = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [it["id"] for it in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        return self.send_json(200, _page(data[:int(limit)], len(data) > int(limit)))

    def bad_fields(self, body: Any, fields: set[str]) -> bool:
        if not isinstance(body, dict):
            self.send_json(400, _err("The body must be a JSON object.", "invalid_value"))
            return True
        return self.refused(body, fields)

    def bad_items(self, items: Any, empty: bool) -> bool:
        if items is None and empty:
            return False
        problem = "expected a list of 1 to 20 items" if not isinstance(items, list) or not 1 <= len(items) <= 20 \
            else self.check_input(items, _calls_in(items))
        if problem:
            self.send_json(400, _err(f"Invalid 'items': {problem}", "invalid_value", "items"))
        return bool(problem)

    def bad_metadata(self, metadata: Any) -> bool:
        ok = metadata is None or (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()))
        if not ok:
            self.send_json(400, _err("Invalid 'metadata': at most 16 pairs, keys of 64 characters, string values "
                                     "of 512.", "invalid_value", "metadata"))
        return not ok

    def refused(self, body: Any, fields: set[str]) -> bool:
        """Unknown parameters and unknown previous ids, refused as OpenAI does (True: answered)."""
        extra = set(body) - fields if isinstance(body, dict) else {"<not an object>"}
        if extra:
            self.send_json(400, _err(f"Unknown parameter: '{sorted(extra)[0]}'.", "unknown_parameter",
                                     sorted(extra)[0]))
            return True
        prev = body.get("previous_response_id")
        if prev is not None and self.upstream.visible(prev, self.headers.get("authorization")) is None:
            self.send_json(404, _err(f"Previous response with id '{prev}' not found.", "previous_response_not_found",
                                     "previous_response_id"))
            return True
        return False

    def compact(self, body: Any) -> None:
        """OpenAI's compaction: the user messages kept, the rest as one opaque compaction item."""
        if self.refused(body, {"model", "input", "previous_response_id", "instructions", "prompt_cache_key"}):
            return
        prev = body.get("previous_response_id")
        inp = body.get("input")
        items = self.upstream.stored[prev]["input"] if prev else []
        items = items + ([{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp or []))
        kept = [{"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": self.last_user([it])}]}
                for it in items if it.get("role") == "user"]
        self.send_json(200, {"id": "resp_" + uuid.uuid4().hex, "object": "response.compaction",
                             "created_at": int(time.time()),
                             "output": [*kept, {"type": "compaction", "id": "cmp_" + uuid.uuid4().hex,
                                                "encrypted_content": COMPACTED + uuid.uuid4().hex}],
                             "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0},
                                       "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
                                       "total_tokens": 18}})

    @staticmethod
    def last_user(inp: Any) -> str:
        if isinstance(inp, str):
            return inp
        for item in reversed(inp or []):
            if item.get("role") == "user":
                c = item.get("content")
                return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "input_text")
        return ""

    @staticmethod
    def check_input(inp: Any, calls: set[str]) -> str | None:
        if isinstance(inp, str):
            return None
        if not isinstance(inp, list):
            return "input must be a string or a list"
        for item in inp:
            kind = item.get("type", "message")
            if kind == "message":
                if item.get("role") not in ("user", "assistant", "system", "developer"):
                    return f"invalid role {item.get('role')}"
                content = item.get("content")
                if isinstance(content, list):
                    allowed = {"output_text", "refusal"} if item["role"] == "assistant" else {
                        "input_text", "input_image", "input_file"}
                    bad = [p.get("type") for p in content if p.get("type") not in allowed]
                    if bad:
                        return f"invalid content part {bad[0]} for role {item['role']}"
            elif kind == "function_call":
                calls.add(item["call_id"])
            elif kind == "compaction":
                if not str(item.get("encrypted_content", "")).startswith(COMPACTED):
                    return "Invalid encrypted_content: not produced by this server's compaction"
            elif kind == "compaction_trigger":
                if item is not inp[-1]:
                    return "The 'compaction_trigger' item must be the final input item."
            elif kind == "function_call_output":
                if item.get("call_id") not in calls:
                    return f"No tool call found for function call output with call_id {item.get('call_id')}."
            else:
                return f"unsupported item type {kind}"
        return None

    def response(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        status = "incomplete" if reply.finish in ("length", "content_filter") else "completed"
        if reply.reasoning:
            output.append({"type": "reasoning", "id": "rs_" + uuid.uuid4().hex,
                           "summary": [{"type": "summary_text", "text": reply.reasoning}]})
        if reply.text:
            output.append({"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": status, "role": "assistant",
                           "content": [{"type": "output_text", "text": reply.text, "annotations": []}]})
        for i, (name, args) in enumerate(reply.calls):
            output.append({"type": "function_call", "id": f"fc_{i}_{uuid.uuid4().hex[:6]}",
                           "call_id": f"call_{i}_{uuid.uuid4().hex[:6]}", "name": name, "arguments": args,
                           "status": "completed"})
        return {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "status": status, "model": reply.model or body["model"], "output": output,
            "incomplete_details": {"reason": "max_output_tokens" if reply.finish == "length" else reply.finish}
            if status == "incomplete" else None,
            "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 7,
                      "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 18} if reply.usage else None,
            "error": None, "instructions": body.get("instructions"), "tools": body.get("tools", []),
            "parallel_tool_calls": True, "tool_choice": "auto", "text": {"format": {"type": "text"}},
            "previous_response_id": body.get("previous_response_id"),
        }

    def responses_stream(self, response: dict[str, Any], reply: Reply) -> list[tuple[int, bytes]]:
        """The stream, sent; its events (sequence number, SSE frame) returned for a resumable one."""
        self.start_sse()
        seq = 0
        frames: list[tuple[int, bytes]] = []

        def send(kind: str, **fields: Any) -> None:
            nonlocal seq
            ev = {"type": kind, "sequence_number": seq, **fields}
            frames.append((seq, f"event: {kind}\ndata: {json.dumps(ev)}\n\n".encode()))
            seq += 1
            self.send_chunk(frames[-1][1])

        shell = {**response, "status": "in_progress", "output": [], "usage": None}
        send("response.created", response=shell)
        send("response.in_progress", response=shell)
        for idx, item in enumerate(response["output"]):
            kind = item["type"]
            if kind == "reasoning":
                send("response.output_item.added", output_index=idx, item={**item, "summary": []})
                text = item["summary"][0]["text"]
                send("response.reasoning_summary_part.added", item_id=item["id"], output_index=idx, summary_index=0,
                     part={"type": "summary_text", "text": ""})
                for p in _pieces(text):
                    send("response.reasoning_summary_text.delta", item_id=item["id"], output_index=idx,
                         summary_index=0, delta=p)
                send("response.reasoning_summary_text.done", item_id=item["id"], output_index=idx, summary_index=0,
                     text=text)
                send("response.reasoning_summary_part.done", item_id=item["id"], output_index=idx, summary_index=0,
                     part={"type": "summary_text", "text": text})
            elif kind == "message":
                send("response.output_item.added", output_index=idx, item={**item, "content": [], "status": "in_progress"})
                text = item["content"][0]["text"]
                send("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                     part={"type": "output_text", "text": "", "annotations": []})
                for p in _pieces(text, reply.pieces):
                    send("response.output_text.delta", item_id=item["id"], output_index=idx, content_index=0, delta=p)
                send("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0, text=text)
                send("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                     part=item["content"][0])
            elif kind == "compaction":
                send("response.output_item.added", output_index=idx, item=item)
            elif kind == "function_call":
                send("response.output_item.added", output_index=idx,
                     item={**item, "arguments": "", "status": "in_progress"})
                # Every other call sends its arguments only in `.done`, as some servers do.
                if idx % 2 == 0:
                    for p in _pieces(item["arguments"]):
                        send("response.function_call_arguments.delta", item_id=item["id"], output_index=idx, delta=p)
                send("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                     arguments=item["arguments"])
            if reply.cut:
                self.stop(reply)
                return frames
            send("response.output_item.done", output_index=idx, item=item)
        terminal = "response.completed" if response["status"] == "completed" else "response.incomplete"
        send(terminal, response=response)
        self.end_chunks()
        return frames


def _with_ids(inp: Any) -> list[dict[str, Any]]:
    """Input items as a conversation keeps them: typed, content as parts, each with its id."""
    items = [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp or [])
    out = []
    for it in items:
        it = {"type": "message", **it}
        if it["type"] == "message" and isinstance(it.get("content"), str):
            part = "output_text" if it.get("role") == "assistant" else "input_text"
            it["content"] = [{"type": part, "text": it["content"]}]
        prefix = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}.get(it["type"], "item_")
        out.append({"id": prefix + uuid.uuid4().hex, **it})
    return out


def _calls_in(items: list[dict[str, Any]]) -> set[str]:
    return {it["call_id"] for it in items if it.get("type") == "function_call"}


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


class ResponsesServer(_Server):
    """`per_caller`: as OpenAI, each stored response is visible only to the key that made it (a vLLM or
    Ollama server, the default, checks no key and serves whoever names the id). `compact_endpoint=False`:
    `/v1/responses/compact` is a 404, as for some OpenAI accounts (compaction only by `compaction_trigger`)."""

    handler = _ResponsesHandler

    def __init__(self, per_caller: bool = False, tls: ssl.SSLContext | None = None,
                 compact_endpoint: bool = True) -> None:
        self.stored: dict[str, dict[str, Any]] = {}  # ids this instance produced: all it can continue
        self.conversations: dict[str, dict[str, Any]] = {}  # its own: {"conversation", "items", "caller"}
        self.per_caller = per_caller
        self.compact_endpoint = compact_endpoint
        super().__init__(tls)

    def visible(self, response_id: str, caller: str | None) -> dict[str, Any] | None:
        stored = self.stored.get(response_id)
        if stored is None or (self.per_caller and stored.get("caller") != caller):
            return None
        return stored

    def conversation(self, conversation_id: str, caller: str | None) -> dict[str, Any] | None:
        held = self.conversations.get(conversation_id)
        if held is None or (self.per_caller and held.get("caller") != caller):
            return None
        return held

    def reset(self) -> None:
        super().reset()
        self.stored.clear()
        self.conversations.clear()

    def calls_before(self, response_id: str | None) -> set[str]:
        """Function call ids of a stored conversation: what a function_call_output may answer."""
        calls = set()
        while response_id is not None and response_id in self.stored:
            response = self.stored[response_id]["response"]
            calls |= {o["call_id"] for o in response["output"] if o["type"] == "function_call"}
            response_id = response.get("previous_response_id")
        return calls


class _MixedHandler(_ChatHandler, _ResponsesHandler):
    upstream: MixedServer

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": self.upstream.models})
        else:
            _ResponsesHandler.do_GET(self)

    def do_POST(self) -> None:
        body = self.read_json()
        self.read_json = lambda: body  # type: ignore[method-assign]  # the path's handler reads it again
        try:
            self._dispatch(body)
        finally:
            del self.read_json  # the handler lives as long as the connection: the next request has its own

    def _dispatch(self, body: Any) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if self.path == "/v1/chat/completions" and model in self.upstream.responses_only:
            self.upstream.requests.append({"path": self.path, "body": body, "raw": self.raw_body})
            self.send_json(400, _err("This model is only supported in v1/responses and not in v1/chat/completions.",
                                     param="model"))
        elif self.path == "/v1/responses" and model in self.upstream.chat_only:
            self.upstream.requests.append({"path": self.path, "body": body, "raw": self.raw_body})
            self.send_json(400, _err(f"The model {model} is not supported with the Responses API.", param="model"))
        elif self.path == "/v1/chat/completions":
            _ChatHandler.do_POST(self)
        else:
            _ResponsesHandler.do_POST(self)


class MixedServer(ResponsesServer):
    """A server with both APIs where some models answer on one only (like OpenAI, Azure, Copilot)."""

    handler = _MixedHandler

    def __init__(self, responses_only: set[str], chat_only: set[str], models: list[dict[str, Any]],
                 tls: ssl.SSLContext | None = None) -> None:
        self.responses_only, self.chat_only, self.models = responses_only, chat_only, models
        super().__init__(tls=tls)


class _HostedHandler(_MixedHandler):
    upstream: HostedServer

    def do_GET(self) -> None:
        if self._admit():
            _MixedHandler.do_GET(self)

    def do_POST(self) -> None:
        sent = self.path
        if not self._admit():
            return
        body = self.read_json()
        problem = self.upstream.refuse_body(sent, body)
        if problem is not None:
            self.send_json(*problem)
            return
        self.read_json = lambda: body  # type: ignore[method-assign]
        try:
            _MixedHandler.do_POST(self)
        finally:
            with contextlib.suppress(AttributeError):
                del self.read_json

    def _admit(self) -> bool:
        """What a provider checks first: its own key in its own header, then its own paths."""
        up = self.upstream
        up.seen.append({"path": self.path, "headers": dict(self.headers)})
        header, value = up.expect
        if self.headers.get(header) != value:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}})
            return False
        path = up.own_path(self.path)
        if path is None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_json(404, {"error": {"code": "404", "message": "Resource not found"}})
            return False
        self.path = path
        return True


class HostedServer(MixedServer):
    """A hosted provider over TLS (None: plain HTTP, as behind a proxy): answers only with its key (`expect`: header and value; the test may
    change it, as a rotated key) and only under its path prefix (OpenRouter's /api). `seen` is every
    request as it arrived, refused ones included."""

    handler = _HostedHandler

    def __init__(self, tls: ssl.SSLContext | None, expect: tuple[str, str], prefix: str = "",
                 responses_only: set[str] | frozenset[str] = frozenset(), chat_only: set[str] | frozenset[str] = frozenset(),
                 models: list[dict[str, Any]] | None = None) -> None:
        self.expect, self.prefix = expect, prefix
        self.seen: list[dict[str, Any]] = []
        super().__init__(set(responses_only), set(chat_only), models or [], tls=tls)

    def own_path(self, path: str) -> str | None:
        """The OpenAI path a request's path stands for here (None: not one of this provider's)."""
        return path[len(self.prefix):] if path.startswith(self.prefix + "/v1/") else None

    def refuse_body(self, path: str, body: Any) -> tuple[int, Any] | None:
        """A provider's own refusal of a request it found a path for (None: served)."""
        return None

    def reset(self) -> None:
        super().reset()
        self.seen.clear()


DEPLOYMENT_NOT_FOUND = {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource "
                                  "does not exist. If you created the deployment within the last 5 minutes, please "
                                  "wait a moment and try again."}}


class AzureServer(HostedServer):
    """Azure OpenAI as it answers: the `api-key` header; the classic deployment paths
    (/openai/deployments/{deployment}/chat/completions, /openai/responses) only with the one
    api-version it supports, and the v1 paths (/openai/v1/...); deployments it does not have are
    DeploymentNotFound, on the path or as the body's model where the path names none."""

    def __init__(self, tls: ssl.SSLContext, key: str, api_version: str, deployments: set[str]) -> None:
        self.api_version, self.deployments = api_version, deployments
        super().__init__(tls, ("api-key", key))

    def own_path(self, path: str) -> str | None:
        bare, _, query = path.partition("?")
        if bare.startswith("/openai/v1/"):
            return bare[len("/openai"):]
        if parse_qs(query).get("api-version") != [self.api_version]:
            return None  # what Azure says for a missing or unsupported api-version: Resource not found
        parts = bare.split("/")
        if len(parts) == 6 and parts[:3] == ["", "openai", "deployments"] and "/".join(parts[4:]) == "chat/completions":
            return "/v1/chat/completions" if parts[3] in self.deployments else None
        return "/v1" + bare[len("/openai"):] if bare.startswith("/openai/responses") else None

    def refuse_body(self, path: str, body: Any) -> tuple[int, Any] | None:
        names_deployment = path.startswith("/openai/deployments/")
        model = body.get("model") if isinstance(body, dict) else None
        return None if names_deployment or model in self.deployments else (404, DEPLOYMENT_NOT_FOUND)


MESSAGES_FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers", "context_management",
    "output_config", "cache_control", "inference_geo", "speed",
}
_BLOCKS = {"user": {"text", "image", "tool_result", "document"},
           "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}
MESSAGES_USAGE = {"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3, "output_tokens": 7}


def _anthropic_err(status: int, kind: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "error", "error": {"type": kind, "message": message}}


class _MessagesHandler(_Handler):
    """Anthropic's API as a Claude-compatible server answers it: /v1/messages only, `anthropic-version`
    required, unknown fields and malformed turns refused in Anthropic's error shape."""

    upstream: MessagesServer

    def do_GET(self) -> None:
        self.send_json(*_anthropic_err(404, "not_found_error", f"Not found: {self.path}"))

    def do_POST(self) -> None:
        body = self.read_json()
        self.upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                       "raw": self.raw_body})
        if self.path == "/v1/messages/count_tokens":
            extra = set(body) - {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config"}
            if extra:
                self.send_json(*_anthropic_err(400, "invalid_request_error", f"{sorted(extra)[0]}: Extra inputs are not permitted"))
            else:
                self.send_json(200, {"input_tokens": 42})
            return
        if self.path != "/v1/messages":
            self.send_json(*_anthropic_err(404, "not_found_error", f"Not found: {self.path}"))
            return
        if not self.headers.get("anthropic-version"):
            self.send_json(*_anthropic_err(400, "invalid_request_error", "anthropic-version: header is required"))
            return
        key = self.upstream.api_key
        if key is not None and self.headers.get("x-api-key") != key:
            self.send_json(*_anthropic_err(401, "authentication_error", "invalid x-api-key"))
            return
        problem = self.check(body)
        if problem:
            self.send_json(*_anthropic_err(400, "invalid_request_error", problem))
            return
        last = body["messages"][-1]["content"]
        reply = self.reply_for(last if isinstance(last, str) else json.dumps(last))
        if reply.error:
            self.send_json(*reply.error)
            return
        if self.send_broken(reply, bool(body.get("stream"))):
            return
        message = self.message(body, reply)
        if body.get("stream"):
            self.stream(message, reply)
        else:
            self.send_json(200, message)

    @staticmethod
    def check(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body: expected an object"
        extra = set(body) - MESSAGES_FIELDS
        if extra:
            return f"{sorted(extra)[0]}: Extra inputs are not permitted"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        thinking = body.get("thinking") or {}
        if thinking.get("type") == "enabled" and not thinking.get("budget_tokens", 0) < body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
        if thinking.get("type") == "enabled" and (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        uses: set[str] = set()
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in _BLOCKS:
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            if i and messages[i - 1].get("role") == role:
                return f"messages.{i}: roles must alternate between 'user' and 'assistant'"
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not blocks:
                return f"messages.{i}.content: expected a string or a non-empty list"
            for j, b in enumerate(blocks):
                if b.get("type") not in _BLOCKS[role]:
                    return f"messages.{i}.content.{j}.type: {b.get('type')!r} is not valid in a {role} message"
                if b["type"] == "tool_use":
                    if not isinstance(b.get("input"), dict):
                        return f"messages.{i}.content.{j}.input: expected an object"
                    uses.add(b["id"])
                if b["type"] == "tool_result" and b.get("tool_use_id") not in uses:
                    return f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks"
                if b["type"] == "thinking" and not str(b.get("signature", "")).startswith("sig-"):
                    return f"messages.{i}.content.{j}.signature: Invalid `signature` in `thinking` block"
        last_assistant = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
        in_tool_loop = last_assistant is not None and messages[-1]["role"] == "user" and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in messages[-1]["content"])
        if thinking.get("type") == "enabled" and in_tool_loop and not (
                isinstance(last_assistant["content"], list)
                and last_assistant["content"][0].get("type") in ("thinking", "redacted_thinking")):
            return ("Expected thinking or redacted_thinking, but found tool_use. When thinking is enabled, a final "
                    "assistant message must start with a thinking block. To avoid this requirement, disable thinking.")
        return None

    def message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.reasoning:
            content.append({"type": "thinking", "thinking": reply.reasoning, "signature": "sig-" + uuid.uuid4().hex})
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        content += [{"type": "tool_use", "id": f"toolu_{i}_{uuid.uuid4().hex[:6]}", "name": n, "input": json.loads(a)}
                    for i, (n, a) in enumerate(reply.calls)]
        stop = "tool_use" if reply.calls else {"length": "max_tokens", "content_filter": "refusal"}.get(reply.finish,
                                                                                                       "end_turn")
        return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": reply.model or body["model"],
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": dict(MESSAGES_USAGE) if reply.usage else {"input_tokens": 0, "output_tokens": 0}}

    def stream(self, message: dict[str, Any], reply: Reply) -> None:
        self.start_sse()

        def send(kind: str, **fields: Any) -> None:
            self.send_chunk(f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode())

        send("message_start", message={**message, "content": [], "stop_reason": None,
                                       "usage": {**message["usage"], "output_tokens": 1}})
        send("ping")
        for i, block in enumerate(message["content"]):
            kind = block["type"]
            empty = {"tool_use": {**block, "input": {}}, "text": {"type": "text", "text": ""},
                     "thinking": {"type": "thinking", "thinking": "", "signature": ""}}[kind]
            send("content_block_start", index=i, content_block=empty)
            if kind == "tool_use":
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(json.dumps(block["input"]))]
            elif kind == "thinking":
                deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"])]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"], reply.pieces)]
            for delta in deltas:
                send("content_block_delta", index=i, delta=delta)
            send("content_block_stop", index=i)
        if reply.cut:
            self.stop(reply)
            return
        send("message_delta", delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
             usage=message["usage"])
        send("message_stop")
        self.end_chunks()


class MessagesServer(_Server):
    """An Anthropic-compatible server (hosted Claude): answers /v1/messages only."""

    handler = _MessagesHandler

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        super().__init__()
