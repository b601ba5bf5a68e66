"""A Responses event stream from a Responses-only model, as the Messages event stream an Anthropic
client expects.

Output items arrive one after another, as Anthropic's blocks do: reasoning becomes a thinking block
(its `encrypted_content`, in `output_item.done`, the `signature_delta`), message text a text block,
each function call a tool_use block whose arguments are complete by its end, however the upstream
split them between deltas and `.done` events.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import objects, read, upstream_failure
from extproc.translate.messages import stop_of_status, usage_of_responses
from extproc.translate.resp_responses_to_chat import reasoning_text
from extproc.translate.sse import encode
from extproc.translate.stream_base import event_json
from extproc.translate.stream_to_messages import MessagesStream

_TEXT = {"response.output_text.delta", "response.refusal.delta"}
_THINKING = {"response.reasoning_summary_text.delta", "response.reasoning_text.delta"}


class ResponsesToMessagesStream(MessagesStream):
    def __init__(self, model: str):
        super().__init__(model)
        self.call: str | None = None  # the output item id of the tool call being streamed
        self.sent = 0  # characters of its arguments sent
        self.done_calls: set[str] = set()
        self.called = False
        self.refused = False

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        """A finished Response as the events that carry it: each output item added, its deltas, done."""
        events: list[dict[str, Any]] = [{"type": "response.created", "response": doc}]
        for where, item in objects(doc, "output"):
            events.append({"type": "response.output_item.added", "item": item})
            kind = item.get("type")
            if kind == "message":
                events += [{"type": f"response.{part['type']}.delta", "delta": part.get(part["type"].removeprefix("output_"))}
                           for _, part in objects(item, "content", where) if part.get("type") in ("output_text", "refusal")]
            elif kind == "reasoning":
                events.append({"type": "response.reasoning_summary_text.delta", "delta": reasoning_text(item, where)})
            events.append({"type": "response.output_item.done", "item": item})
        events.append({"type": "response.completed", "response": doc})
        return b"".join(encode(orjson.dumps(ev)) for ev in events)

    def _end_early(self) -> None:
        self._fail("upstream_incomplete", "the upstream stream ended before the response completed")

    def _event(self, data: str) -> None:
        ev = event_json(data)
        kind = read(ev, "type", str)
        if kind in ("response.created", "response.in_progress", "response.queued"):
            response = read(ev, "response", dict) or {}
            self._start(read(response, "model", str, "response"))
        elif kind in ("response.failed", "error"):
            response = ev.get("response")
            err = ev.get("error") or (response.get("error") if isinstance(response, dict) else None) or \
                (ev if kind == "error" else None)
            self._fail(*upstream_failure(err, "the upstream response failed"))
        elif kind in _TEXT:
            self._text_delta(read(ev, "delta", str) or "", kind == "response.refusal.delta")
        elif kind in _THINKING:
            self._end_call()
            self.thinking(read(ev, "delta", str) or "")
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self._item(read(ev, "item", dict) or {}, kind.endswith(".done"))
        elif kind == "response.function_call_arguments.delta":
            self._arguments(read(ev, "item_id", str), read(ev, "delta", str) or "", whole=False)
        elif kind == "response.function_call_arguments.done":
            self._arguments(read(ev, "item_id", str), read(ev, "arguments", str) or "", whole=True)
        elif kind in ("response.completed", "response.incomplete"):
            self._complete(read(ev, "response", dict) or {})

    def _text_delta(self, text: str, refusal: bool) -> None:
        self._end_call()
        self.refused = self.refused or refusal
        self.text(text)

    def _item(self, item: dict[str, Any], done: bool) -> None:
        kind = item.get("type")
        if kind == "reasoning" and done:
            self._end_call()
            signature = read(item, "encrypted_content", str, "item")
            if signature:
                self.signature(signature)
            if self.open is not None and self.open["type"] == "thinking":
                self._close_block()
        elif kind == "function_call":
            item_id = read(item, "id", str, "item") or read(item, "call_id", str, "item") or ""
            if item_id in self.done_calls:
                return
            if self.call != item_id:
                self._end_call()
                self.call, self.sent, self.called = item_id, 0, True
                call_id = read(item, "call_id", str, "item") or item_id
                self.tool_use(call_id, read(item, "name", str, "item") or "")
            if done:
                self._arguments(item_id, read(item, "arguments", str, "item") or "", whole=True)
                self._end_call()

    def _arguments(self, item_id: str | None, text: str, whole: bool) -> None:
        """Arguments of the open call: deltas as they come; a whole text adds what the deltas did not."""
        if item_id != self.call:
            if item_id in self.done_calls:
                raise BadUpstream("function_call_arguments", f"continue the call {item_id!r} after it ended")
            return  # a call never announced: its output_item.done brings it whole
        part = text[self.sent:] if whole else text
        if part:
            self.sent += len(part)
            self.tool_json(part)

    def _end_call(self) -> None:
        if self.call is not None:
            self.done_calls.add(self.call)
            self.call = None
            self._close_block()

    def _complete(self, response: dict[str, Any]) -> None:
        self._end_call()
        status = read(response, "status", str, "response")
        reason = read(read(response, "incomplete_details", dict, "response") or {}, "reason", str,
                      "response.incomplete_details")
        stop = stop_of_status(status, reason, self.called)
        self.finish("refusal" if self.refused and stop == "end_turn" else stop, None,
                    usage_of_responses(response, "response"))
