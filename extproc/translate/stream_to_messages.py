"""Anthropic's stream grammar, written for any upstream stream: the one place its rules are kept.

`message_start` first; then content blocks one at a time, each `content_block_start` (indexes 0, 1, 2
...), its deltas of the block's own kind (`text_delta`, `thinking_delta` then one `signature_delta`,
`input_json_delta`), `content_block_stop`; then one `message_delta` (stop_reason, usage) and
`message_stop`. A failure is an `error` event, which ends the stream (as Anthropic's own do). The
subclasses read their upstream's events and call the writing methods; the block order is kept here.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import new_id
from extproc.translate.messages import accounted, message_shell, thinking_block, tool_input
from extproc.translate.sse import encode
from extproc.translate.stream_base import SSETranslator

# The Anthropic error type for a failure code of the sidecar or an upstream's stream.
_ERROR_TYPES = {"rate_limit_exceeded": "rate_limit_error", "overloaded": "overloaded_error",
                "server_is_overloaded": "overloaded_error", "slow_down": "overloaded_error"}


class MessagesStream(SSETranslator):
    def __init__(self, model: str):
        super().__init__()
        self.message = message_shell(new_id("msg_"), model)
        self.started = False
        self.open: dict[str, Any] | None = None  # the block being streamed
        self.partial = ""  # the open tool_use block's input JSON so far
        self.response: dict[str, Any] | None = None

    def _send(self, kind: str, **fields: Any) -> None:
        self.out.append(encode(orjson.dumps({"type": kind, **fields}), kind))

    def _start(self, model: str | None = None) -> None:
        if self.started:
            return
        self.started = True
        if model:
            self.message["model"] = self.upstream_model = model
        self._send("message_start", message=self.message)

    def _block(self, block: dict[str, Any]) -> None:
        """Open a new block (closing the one before): its start carries the block empty."""
        self._start()
        self._close_block()
        self.open = block
        self.message["content"].append(block)
        empty: dict[str, Any] = {k: "" if k in ("text", "thinking", "signature") else v for k, v in block.items()}
        self._send("content_block_start", index=len(self.message["content"]) - 1, content_block=empty)

    def _delta(self, delta: dict[str, Any]) -> None:
        self._send("content_block_delta", index=len(self.message["content"]) - 1, delta=delta)

    def _close_block(self) -> None:
        block, self.open = self.open, None
        if block is None:
            return
        if block["type"] == "thinking":
            block.update(thinking_block(block["thinking"], block["signature"] or None))
            self._delta({"type": "signature_delta", "signature": block["signature"]})
        elif block["type"] == "tool_use":
            block["input"] = tool_input(self.partial, f"content[{len(self.message['content']) - 1}].input")
            self.partial = ""
        self._send("content_block_stop", index=len(self.message["content"]) - 1)

    # -- what the subclasses write ------------------------------------------------------------

    def text(self, text: str) -> None:
        if not text:
            return
        if self.open is None or self.open["type"] != "text":
            self._block({"type": "text", "text": ""})
        assert self.open is not None
        self.open["text"] += text
        self._delta({"type": "text_delta", "text": text})

    def thinking(self, text: str) -> None:
        if not text:
            return
        if self.open is None or self.open["type"] != "thinking":
            self._block({"type": "thinking", "thinking": "", "signature": ""})
        assert self.open is not None
        self.open["thinking"] += text
        self._delta({"type": "thinking_delta", "thinking": text})

    def signature(self, signature: str) -> None:
        """The upstream's own signature for the thinking block just streamed (sent as it closes); one
        for reasoning that was not shown opens its block, empty."""
        if self.open is None or self.open["type"] != "thinking":
            self._block({"type": "thinking", "thinking": "", "signature": ""})
        assert self.open is not None
        self.open["signature"] = signature

    def tool_use(self, call_id: str, name: str) -> None:
        self._block({"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def tool_json(self, partial: str) -> None:
        if partial and self.open is not None and self.open["type"] == "tool_use":
            self.partial += partial
            self._delta({"type": "input_json_delta", "partial_json": partial})

    def finish(self, stop_reason: str, stop_sequence: str | None, usage: dict[str, Any] | None) -> None:
        self._start()
        self._close_block()
        message = self.message
        message["stop_reason"], message["stop_sequence"] = stop_reason, stop_sequence
        if usage is not None:
            message["usage"] = usage
        self._send("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   usage=message["usage"])
        self._send("message_stop")
        self.ended = True
        self.response = accounted(message, reported=usage is not None)

    def _finish(self) -> None:
        """The upstream's stream has ended (its own end marker, or no more bytes)."""
        raise NotImplementedError

    def _end_early(self) -> None:
        try:
            self._finish()
        except BadUpstream as e:  # a tool input that is not JSON after all: the stream still ends
            self._fail(e.code or "bad_upstream_response", e.message)

    def _fail(self, code: str, message: str) -> None:
        """An `error` event ends the stream: the SDKs raise it, with whatever was streamed before."""
        if self.ended:
            return
        self._start()
        self._send("error", error={"type": _ERROR_TYPES.get(code, "api_error"), "message": message})
        self.ended = True
