"""A Responses event stream from a Responses-only model, as the chat.completion.chunk stream a Chat client expects.

Each tool call gets its own `index`; arguments that arrive only in `*.done` or `output_item.done`
are still delivered, exactly once. The stream always ends with `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from extproc.translate.common import finish_reason, upstream_failure
from extproc.translate.resp_responses_to_chat import chat_id
from extproc.translate.sse import DONE, encode
from extproc.translate.stream_to_chat import ChatStream
from extproc.translate.wire import (
    ArgumentsEvent,
    DeltaEvent,
    EventKind,
    ItemEvent,
    OutputItem,
    ResponseEvent,
    ResponseObject,
    convert,
    decode,
)

_DELTA_KEYS = {"response.output_text.delta": "content", "response.refusal.delta": "refusal"}
_PART_TEXT = {"output_text": "text", "refusal": "refusal"}  # message part type -> its text field


class _Call:
    __slots__ = ("announced", "index", "sent")

    def __init__(self, index: int):
        self.index = index
        self.announced = False
        self.sent = 0  # characters of arguments already sent


class ResponsesToChatStream(ChatStream):
    def __init__(self, request: dict[str, Any], model: str):
        super().__init__(request, model)
        self.started = False
        self.calls: dict[str, _Call] = {}  # by output item id
        self.text: list[str] = []  # what was streamed, for a usage estimate when the upstream reports none
        # The final Response once it came, rebuilt from its checked fields (usage, status) and what was
        # streamed: nothing of the upstream's is passed on unchecked.
        self.response: dict[str, Any] | None = None

    def _start(self, response: ResponseObject | None) -> None:
        if self.started:
            return
        if response is not None:
            self.id = chat_id(response.id) if response.id else self.id
            self.upstream_model = response.model or None
            self.model = response.model or self.model
            self.created = response.created_at or self.created
        self.started = True
        self._chunk({"role": "assistant"})  # content stays null for a turn that only calls tools

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        """A finished Response (`translate_response` has refused the others) as the events this translator
        reads: created, the deltas of each output item (a tool call whole, as its output_item.done), then
        completed, whose status says whether it was incomplete."""
        events: list[dict[str, Any]] = [{"type": "response.created", "response": doc}]
        for item in convert(doc, ResponseObject, "body").output or ():
            if item.type == "message":
                events += [{"type": f"response.{part.type}.delta",
                            "delta": part.text if part.type == "output_text" else part.refusal}
                           for part in item.content or () if part.type in _PART_TEXT]
            elif item.type == "reasoning":
                events.append({"type": "response.reasoning_summary_text.delta", "delta": item.reasoning_text()})
            elif item.type in ("function_call", "custom_tool_call"):
                events.append({"type": "response.output_item.done", "item": item})
        events.append({"type": "response.completed", "response": doc})  # failed ones never get here
        return b"".join(encode(msgspec.json.encode(ev)) for ev in events)

    def _end_early(self) -> None:
        self._fail("upstream_incomplete", "the upstream stream ended before the response completed")

    def _event(self, data: str) -> None:
        if data.strip() == "[DONE]":
            return
        kind = decode(data, EventKind, "stream event").type
        if kind in ("response.created", "response.in_progress", "response.queued"):
            self._start(decode(data, ResponseEvent, "stream event").response)
            return
        if kind in ("response.failed", "error"):
            ev = orjson.loads(data)  # read leniently: the upstream's error is passed on as far as it makes sense
            response = ev.get("response")
            # An `error` event carries code and message itself (the spec's ErrorStreamEvent); some servers nest them.
            err = ev.get("error") or (response.get("error") if isinstance(response, dict) else None) or \
                (ev if kind == "error" else None)
            self._fail(*upstream_failure(err, "the upstream response failed"))
            return
        self._start(None)
        if kind in ("response.output_text.delta", "response.refusal.delta", "response.reasoning_summary_text.delta",
                    "response.reasoning_text.delta"):
            delta = decode(data, DeltaEvent, "stream event").delta
            if delta:
                self.text.append(delta)
                self._chunk({_DELTA_KEYS.get(kind, "reasoning_content"): delta})
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = decode(data, ItemEvent, "stream event").item or OutputItem()
            if item.type in ("function_call", "custom_tool_call"):
                full = item.arguments or item.input or ""
                call = self._announce(item)
                if kind == "response.output_item.done":
                    self._complete_args(call, full)
        elif kind in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta",
                      "response.function_call_arguments.done"):
            args = decode(data, ArgumentsEvent, "stream event")
            text = args.arguments if kind.endswith(".done") else args.delta
            known = self.calls.get(args.item_id or "")
            if known is None or not text:
                return
            call = known
            if kind.endswith(".done"):
                self._complete_args(call, text)
            else:
                self._args(call, text)
        elif kind in ("response.completed", "response.incomplete"):
            self._complete(decode(data, ResponseEvent, "stream event").response or ResponseObject())

    def _announce(self, item: OutputItem) -> _Call:
        call_id, name = item.call_id, item.name or ""
        key = item.id or call_id or ""
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = _Call(len(self.calls))
        if not call.announced:
            call.announced = True
            if item.type == "custom_tool_call":
                head = {"index": call.index, "id": call_id, "type": "custom", "custom": {"name": name, "input": ""}}
            else:
                head = {"index": call.index, "id": call_id, "type": "function",
                        "function": {"name": name, "arguments": ""}}
            self._chunk({"tool_calls": [head]})
        return call

    def _args(self, call: _Call, text: str) -> None:
        call.sent += len(text)
        self._chunk({"tool_calls": [{"index": call.index, "function": {"arguments": text}}]})

    def _complete_args(self, call: _Call, full: str) -> None:
        """Send what the deltas did not: all of it when none came, else nothing."""
        if len(full) > call.sent:
            self._args(call, full[call.sent:])

    def _complete(self, response: ResponseObject) -> None:
        status = response.status
        reason = response.incomplete_details.reason if response.incomplete_details else None
        usage = response.usage.as_chat() if response.usage else None
        self.response = {"id": response.id, "status": status, "usage": usage,
                         "output": [{"type": "message", "content": [{"type": "output_text", "text": "".join(self.text)}]}]}
        self._chunk({}, finish_reason(status, reason, bool(self.calls)))
        if self.include_usage:
            usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "system_fingerprint": None, "choices": [], "usage": usage}
            self.out.append(encode(orjson.dumps(usage_chunk)))
        self.out.append(DONE)
        self.ended = True
