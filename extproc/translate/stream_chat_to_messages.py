"""A chat.completion.chunk stream from a chat-only backend, as the Messages event stream an Anthropic
client expects.

Anthropic streams one block at a time, chat servers may interleave the arguments of parallel tool
calls (vLLM announces every call, then sends their arguments in turns). The first call streams as it
comes; a call that starts while another is open is held and sent whole as soon as the open one can
close (text or the end of the turn), so no block is ever reopened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import at, first_choice, need, objects, read
from extproc.translate.messages import stop_reason, usage
from extproc.translate.resp_chat_to_responses import message_text
from extproc.translate.sse import DONE, encode
from extproc.translate.stream_base import ChatChunkReader
from extproc.translate.stream_to_messages import MessagesStream
from extproc.translate.wire import ChatChunk, ChatToolCall, ChatUsage, ChunkChoice


def _usage(u: ChatUsage) -> dict[str, Any]:
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
    return usage(u.prompt_tokens or 0, u.completion_tokens or 0, cached or 0)


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: str = ""
    live: bool = False  # streamed as it comes, in the open block
    sent: bool = False  # its block is closed: nothing may be added


class ChatToMessagesStream(ChatChunkReader, MessagesStream):
    def __init__(self, model: str, stop: list[str]):
        super().__init__(model)
        self.stop = stop
        self.calls: dict[int, _Call] = {}
        self.finish_reason: str | None = None
        self.matched: Any = None  # the stop string a server names (vLLM)
        self.usage: dict[str, Any] | None = None
        self.refused = False  # the model sent a refusal: its stop_reason says so

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        """A chat.completion as one chunk carrying its whole first choice, then [DONE]."""
        where, choice = first_choice(doc)
        message = need(choice, "message", dict, where)
        mw = at(where, "message")
        delta = {**message, "content": message_text(message, mw),
                 "tool_calls": [{**call, "index": i} for i, (_, call) in enumerate(objects(message, "tool_calls", mw))]}
        chunk = {**doc, "object": "chat.completion.chunk",
                 "choices": [{**choice, "index": 0, "delta": delta,
                              "finish_reason": read(choice, "finish_reason", str, where) or "stop"}]}
        return encode(orjson.dumps(chunk)) + DONE

    def _chunk_in(self, chunk: ChatChunk) -> None:
        self._start(chunk.model)
        if chunk.usage is not None:
            self.usage = _usage(chunk.usage)

    def _choice(self, choice: ChunkChoice) -> None:
        delta = choice.delta
        if delta is not None:
            if reasoning := delta.reasoning_text():
                self._flush_calls()
                self.thinking(reasoning)
            if delta.content or delta.refusal:
                self._flush_calls()
                self.text((delta.content or "") + (delta.refusal or ""))
            for call in delta.tool_calls or ():
                self._call(call)
            self.refused = self.refused or bool(delta.refusal)
        if choice.finish_reason:
            self.finish_reason, self.matched = choice.finish_reason, choice.stop_reason

    def _call(self, delta: ChatToolCall) -> None:
        index = len(self.calls) if delta.index is None else delta.index
        fn = delta.function
        arguments = fn.arguments if fn is not None else None
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = _Call(delta.id or f"toolu_{index}", (fn.name if fn else None) or "")
            if not any(c.live or (not c.sent and c is not call) for c in self.calls.values()):
                call.live = True
                self.tool_use(call.id, call.name)
        if not arguments:
            return
        if call.sent:
            raise BadUpstream(f"choices[0].delta.tool_calls (index {index})",
                              "continues a tool call whose block has ended")
        if call.live:
            self.tool_json(arguments)
        else:
            call.arguments += arguments

    def _flush_calls(self) -> None:
        """Close the streamed call and send the held ones whole, in their order."""
        for call in self.calls.values():
            if call.live:
                self._close_block()
            elif not call.sent:
                self.tool_use(call.id, call.name)
                self.tool_json(call.arguments)
                self._close_block()
            call.live, call.sent = False, True

    def _finish(self) -> None:
        if self.finish_reason is None:
            self._fail("upstream_incomplete", "the upstream stream ended before the model finished")
            return
        self._flush_calls()
        reason, sequence = stop_reason(self.finish_reason, self.matched, self.stop)
        if self.refused and reason == "end_turn":
            reason = "refusal"
        self.finish(reason, sequence, self.usage)
