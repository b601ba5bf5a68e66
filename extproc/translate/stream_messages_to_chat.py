"""A Messages event stream from an Anthropic-compatible backend, as the chat.completion.chunk stream a
Chat client expects (and, chained with `ChatToResponsesStream`, the Responses stream of a Responses
client).

Text deltas become `content`, thinking deltas `reasoning_content`, each tool_use block one tool call
with its own `index`; `message_delta` the finish chunk (and the usage chunk when asked for), and
`message_stop` the `[DONE]`. An `error` event is the chat error chunk, then `[DONE]`.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.translate.common import count, objects, read, upstream_failure
from extproc.translate.resp_messages_to_chat import chat_id, chat_usage, finish_of, tool_call
from extproc.translate.sse import DONE, encode
from extproc.translate.stream_base import event_json
from extproc.translate.stream_to_chat import ChatStream


class MessagesToChatStream(ChatStream):
    def __init__(self, request: dict[str, Any], model: str):
        super().__init__(request, model)
        self.blocks: dict[int, str] = {}  # block index -> its type
        self.calls: dict[int, int] = {}  # tool_use block index -> tool call index
        self.usage: dict[str, Any] = {}  # the Messages usage so far (message_start, then message_delta)
        self.finish: str | None = None
        self.text: list[str] = []
        self.thinking: list[dict[str, Any]] = []  # thinking blocks as streamed, signatures included
        self.response: dict[str, Any] | None = None

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        """A whole Message as the events that would have carried it."""
        events: list[dict[str, Any]] = [{"type": "message_start", "message": {**doc, "content": []}}]
        for i, (where, block) in enumerate(objects(doc, "content")):
            kind = read(block, "type", str, where)
            if kind == "tool_use":
                call = tool_call(block, where)
                events += [{"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                           {"type": "content_block_delta", "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": call["function"]["arguments"]}}]
            elif kind in ("text", "thinking"):
                delta = {"type": f"{kind}_delta", kind: read(block, kind, str, where) or ""}
                events += [{"type": "content_block_start", "index": i, "content_block": {"type": kind, kind: ""}},
                           {"type": "content_block_delta", "index": i, "delta": delta}]
                if kind == "thinking":
                    events.append({"type": "content_block_delta", "index": i, "delta": {
                        "type": "signature_delta", "signature": read(block, "signature", str, where) or ""}})
            elif kind == "redacted_thinking":
                events.append({"type": "content_block_start", "index": i, "content_block": block})
            events.append({"type": "content_block_stop", "index": i})
        events += [{"type": "message_delta", "delta": {"stop_reason": doc.get("stop_reason")}, "usage": doc.get("usage")},
                   {"type": "message_stop"}]
        return b"".join(encode(orjson.dumps(ev), ev["type"]) for ev in events)

    def _end_early(self) -> None:
        self._fail("upstream_incomplete", "the upstream stream ended before the message stopped")

    def _event(self, data: str) -> None:
        ev = event_json(data)
        kind = read(ev, "type", str)
        if kind == "message_start":
            msg = read(ev, "message", dict) or {}
            self.id = chat_id(read(msg, "id", str, "message"))
            self.upstream_model = read(msg, "model", str, "message") or None
            self.model = self.upstream_model or self.model
            self.usage.update(read(msg, "usage", dict, "message") or {})
            self._chunk({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            index = count(ev, "index")
            block = read(ev, "content_block", dict) or {}
            btype = read(block, "type", str, "content_block") or ""
            self.blocks[index] = btype
            if btype == "thinking":
                self.thinking.append({"type": "thinking", "thinking": "", "signature": ""})
            elif btype == "redacted_thinking":
                self.thinking.append({"type": "redacted_thinking", "data": read(block, "data", str, "content_block") or ""})
            if btype == "tool_use":
                call = tool_call({**block, "input": {}}, "content_block")
                self.calls[index] = len(self.calls)
                self._chunk({"tool_calls": [{"index": self.calls[index], "id": call["id"], "type": "function",
                                             "function": {"name": call["function"]["name"], "arguments": ""}}]})
        elif kind == "content_block_delta":
            self._delta(count(ev, "index"), read(ev, "delta", dict) or {})
        elif kind == "message_delta":
            delta = read(ev, "delta", dict) or {}
            self.finish = finish_of(read(delta, "stop_reason", str, "delta"), bool(self.calls))
            self.usage.update({k: v for k, v in (read(ev, "usage", dict) or {}).items() if v is not None})
        elif kind == "message_stop":
            self._stop()
        elif kind == "error":
            self._fail(*upstream_failure(_error(ev.get("error")), "the upstream failed"))

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        kind = read(delta, "type", str, "delta")
        if kind == "text_delta" and (text := read(delta, "text", str, "delta")):
            self.text.append(text)
            self._chunk({"content": text})
        elif kind == "thinking_delta" and (text := read(delta, "thinking", str, "delta")):
            if self.blocks.get(index) == "thinking":
                self.thinking[-1]["thinking"] += text
            self._chunk({"reasoning_content": text})
        elif kind == "signature_delta" and self.blocks.get(index) == "thinking" and self.thinking:
            self.thinking[-1]["signature"] = read(delta, "signature", str, "delta") or ""
        elif kind == "input_json_delta" and index in self.calls and (part := read(delta, "partial_json", str, "delta")):
            self._chunk({"tool_calls": [{"index": self.calls[index], "function": {"arguments": part}}]})

    def _stop(self) -> None:
        usage = chat_usage(self.usage, "usage") if self.usage else None
        self._chunk({}, self.finish or "stop")
        if self.include_usage:
            self.out.append(encode(orjson.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                                 "model": self.model, "system_fingerprint": None, "choices": [],
                                                 "usage": usage})))
        self.out.append(DONE)
        self.ended = True
        self.response = {"usage": usage, "output": [{"type": "message", "content": [
            {"type": "output_text", "text": "".join(self.text)}]}]}


def _error(err: Any) -> Any:
    """Anthropic's error object names its kind `type`; the chat error chunk calls it `code`."""
    if isinstance(err, dict) and isinstance(err.get("type"), str):
        return {"code": err["type"], "message": err.get("message")}
    return err
