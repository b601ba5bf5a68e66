"""A Responses event stream from a Responses-only model, as the chat.completion.chunk stream a Chat client expects.

Each tool call gets its own `index`; arguments that arrive only in `*.done` or `output_item.done`
are still delivered, exactly once. The stream always ends with `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.translate.common import finish_reason, now, usage_responses_to_chat
from extproc.translate.resp_responses_to_chat import chat_id
from extproc.translate.sse import encode
from extproc.translate.stream_base import SSETranslator

DONE = b"data: [DONE]\n\n"


class _Call:
    __slots__ = ("announced", "index", "sent")

    def __init__(self, index: int):
        self.index = index
        self.announced = False
        self.sent = 0  # characters of arguments already sent


class ResponsesToChatStream(SSETranslator):
    def __init__(self, request: dict[str, Any], model: str):
        opts = request.get("stream_options")
        self.include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        super().__init__()
        self.id = "chatcmpl-pending"
        self.model = model
        self.created = now()
        self.started = False
        self.calls: dict[str, _Call] = {}  # by output item id
        self.response: dict[str, Any] | None = None  # the upstream's final Response, once it came

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> None:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        self.out.append(encode(orjson.dumps(chunk)))

    def _start(self, response: dict[str, Any] | None) -> None:
        if self.started:
            return
        self.started = True
        if isinstance(response, dict):
            self.id = chat_id(str(response.get("id") or "")) if response.get("id") else self.id
            self.model = response.get("model") or self.model
            self.created = int(response.get("created_at") or self.created)
        self._chunk({"role": "assistant"})  # content stays null for a turn that only calls tools

    def _end_early(self) -> None:
        self._fail("upstream_incomplete", "the upstream stream ended before the response completed")

    def _fail(self, code: str, message: str) -> None:
        """An error chunk (the chat SDKs raise it) and the end of the stream."""
        if not self.ended:
            self.ended = True
            err = {"message": message, "type": "server_error", "param": None, "code": code}
            self.out.append(encode(orjson.dumps({"error": err})))
            self.out.append(DONE)

    def _event(self, data: str) -> None:
        if self.ended or data.strip() == "[DONE]":
            return
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._fail("bad_upstream_response", "the upstream sent a stream event that is not JSON")
            return
        if not isinstance(ev, dict):
            return
        kind = ev.get("type")
        if kind in ("response.created", "response.in_progress", "response.queued"):
            self._start(ev.get("response"))
            return
        self._start(None)
        if kind == "response.output_text.delta":
            if ev.get("delta"):
                self._chunk({"content": ev["delta"]})
        elif kind == "response.refusal.delta":
            if ev.get("delta"):
                self._chunk({"refusal": ev["delta"]})
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            if ev.get("delta"):
                self._chunk({"reasoning_content": ev["delta"]})
        elif kind == "response.output_item.added":
            item = ev.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call"):
                self._announce(item)
        elif kind in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            call = self.calls.get(ev.get("item_id", ""))
            if call is not None and ev.get("delta"):
                self._args(call, ev["delta"])
        elif kind == "response.function_call_arguments.done":
            call = self.calls.get(ev.get("item_id", ""))
            if call is not None:
                self._complete_args(call, ev.get("arguments") or "")
        elif kind == "response.output_item.done":
            item = ev.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call"):
                call = self._announce(item)
                self._complete_args(call, item.get("arguments") or item.get("input") or "")
        elif kind in ("response.completed", "response.incomplete"):
            self._complete(ev.get("response") or {})
        elif kind in ("response.failed", "error"):
            err = ev.get("error") or (ev.get("response") or {}).get("error") or {}
            self._fail(str(err.get("code") or "upstream_error"), str(err.get("message") or "the upstream response failed"))

    def _announce(self, item: dict[str, Any]) -> _Call:
        key = item.get("id") or item.get("call_id") or ""
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = _Call(len(self.calls))
        if not call.announced:
            call.announced = True
            if item.get("type") == "custom_tool_call":
                head = {"index": call.index, "id": item.get("call_id"), "type": "custom",
                        "custom": {"name": item.get("name", ""), "input": ""}}
            else:
                head = {"index": call.index, "id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name", ""), "arguments": ""}}
            self._chunk({"tool_calls": [head]})
        return call

    def _args(self, call: _Call, text: str) -> None:
        call.sent += len(text)
        self._chunk({"tool_calls": [{"index": call.index, "function": {"arguments": text}}]})

    def _complete_args(self, call: _Call, full: str) -> None:
        """Send what the deltas did not: all of it when none came, else nothing."""
        if len(full) > call.sent:
            self._args(call, full[call.sent:])

    def _complete(self, response: dict[str, Any]) -> None:
        self.response = response
        incomplete = response.get("incomplete_details") or {}
        self._chunk({}, finish_reason(response.get("status"), incomplete.get("reason"), bool(self.calls)))
        if self.include_usage:
            usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "system_fingerprint": None, "choices": [],
                           "usage": usage_responses_to_chat(response.get("usage"))}
            self.out.append(encode(orjson.dumps(usage_chunk)))
        self.out.append(DONE)
        self.ended = True
