"""A chat.completion.chunk stream from a chat-only backend, as the Responses event stream a client expects.

Order follows the Responses contract: response.created, response.in_progress, then for each
output item `output_item.added`, its parts and deltas, `output_item.done`, and exactly one terminal
event. Reasoning comes first, as its own item; every tool call is its own function_call item.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import new_id, now
from extproc.translate.resp_chat_to_responses import (
    call_item_id,
    finish,
    message_item,
    reasoning_item,
    response_shell,
    wants_encrypted_reasoning,
)
from extproc.translate.sse import DONE, encode
from extproc.translate.stream_base import ChatChunkReader
from extproc.translate.tools import ToolMap, custom_input, encode_reasoning, tool_map
from extproc.translate.wire import (
    ChatChunk,
    ChatCompletion,
    ChatDelta,
    ChatFunction,
    ChatToolCall,
    ChunkChoice,
    convert,
)


class _Item:
    __slots__ = ("data", "done_parts", "index", "kind", "parts")

    def __init__(self, index: int, kind: str, data: dict[str, Any]):
        self.index = index
        self.kind = kind
        self.data = data  # the item as it will appear in the final Response
        # (type, text pieces): joined once when the part ends, so a long answer costs linear time,
        # where appending to one string copies all of it at every delta
        self.parts: list[tuple[str, list[str]]] = []
        self.done_parts = 0  # parts whose `.done` events were sent (parts end in order)


class ChatToResponsesStream(ChatChunkReader):
    def __init__(self, request: dict[str, Any], response_id: str | None = None, tools: ToolMap | None = None):
        super().__init__()
        self.response = response_shell(request, response_id or new_id("resp_"), now())
        self.tools = tools or tool_map(request.get("tools"))
        self.encrypt_reasoning = wants_encrypted_reasoning(request)
        self.seq = 0
        self.started = False
        self.items: list[_Item] = []
        self.reasoning: _Item | None = None
        self.message: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None  # Responses usage, from the chunk that carried it
        self.closed: set[int] = set()  # output indexes whose output_item.done was sent

    # -- plumbing -----------------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        fields["type"] = kind
        fields["sequence_number"] = self.seq
        self.seq += 1
        self.out.append(encode(orjson.dumps(fields), kind))

    def _start(self, created: int = 0, model: str | None = None) -> None:
        self.started = True
        self.response["created_at"] = created or self.response["created_at"]
        if model:
            self.response["model"] = self.upstream_model = model
        self._emit("response.created", response=self.response)
        self._emit("response.in_progress", response=self.response)

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        """A chat.completion as one chunk carrying its whole first choice, then [DONE]; a choice
        without a finish_reason finished all the same (the answer is complete), as it does buffered."""
        chat = convert(doc, ChatCompletion, "body")
        where, choice = chat.first_choice()
        message = choice.message
        if message is None:
            raise BadUpstream(f"{where}.message", "is missing")
        calls = [ChatToolCall(index=i, id=c.id, function=c.function) for i, c in enumerate(message.tool_calls or ())]
        delta = ChatDelta(content=message.text(), refusal=message.refusal, reasoning_content=message.reasoning_text(),
                          tool_calls=calls)
        chunk = ChatChunk(created=chat.created, model=chat.model, usage=chat.usage, error=chat.error,
                          choices=[ChunkChoice(index=0, delta=delta, finish_reason=choice.finish_reason or "stop")])
        return encode(msgspec.json.encode(chunk)) + DONE

    def _end_early(self) -> None:
        self._finish()  # fails the response when no finish_reason came

    def _fail(self, code: str, message: str) -> None:
        """End the stream with `error` and `response.failed` (upstream error or cut-off)."""
        if self.ended:
            return
        if not self.started:
            self._start()
        self._close_all("incomplete")
        self._emit("error", error={"type": "server_error", "code": code, "message": message, "param": None})
        self.ended = True
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        self.response["output"] = [it.data for it in self.items]
        self._emit("response.failed", response=self.response)

    # -- chat chunks --------------------------------------------------------------------------

    def _chunk_in(self, chunk: ChatChunk) -> None:
        if not self.started:
            self._start(chunk.created or 0, chunk.model)
        if chunk.usage is not None:
            self.usage = chunk.usage.as_responses()

    def _choice(self, choice: ChunkChoice) -> None:
        delta = choice.delta
        if delta is not None:
            if reasoning := delta.reasoning_text():
                self._reasoning_delta(reasoning)
            if delta.content:
                self._text_delta("output_text", delta.content)
            if delta.refusal:
                self._text_delta("refusal", delta.refusal)
            for call in delta.tool_calls or ():
                self._call_delta(call)
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason

    def _new_item(self, kind: str, data: dict[str, Any]) -> _Item:
        item = _Item(len(self.items), kind, data)
        self.items.append(item)
        added = dict(data)
        if kind == "message":
            added["content"] = []
        elif kind == "reasoning":
            added["summary"] = []
        elif kind == "function_call":
            added["arguments"] = ""
        elif kind == "custom_tool_call":
            added["input"] = ""
        if "status" in added:
            added["status"] = "in_progress"
        self._emit("response.output_item.added", output_index=item.index, item=added)
        return item

    def _reasoning_delta(self, text: str) -> None:
        if self.reasoning is None:
            if self.message is not None or self.calls:
                return  # reasoning after the answer started has no place in the item order; drop it
            self.reasoning = self._new_item("reasoning", reasoning_item(new_id("rs_"), ""))
            self._emit("response.reasoning_summary_part.added", item_id=self.reasoning.data["id"],
                       output_index=self.reasoning.index, summary_index=0,
                       part={"type": "summary_text", "text": ""})
        if not self.reasoning.parts:
            self.reasoning.parts.append(("summary_text", []))
        self.reasoning.parts[0][1].append(text)
        self._emit("response.reasoning_summary_text.delta", item_id=self.reasoning.data["id"],
                   output_index=self.reasoning.index, summary_index=0, delta=text)

    def _close_reasoning(self) -> None:
        item = self.reasoning
        if item is None or item.index in self.closed:
            return
        text = "".join(item.parts[0][1]) if item.parts else ""
        item.data["summary"] = [{"type": "summary_text", "text": text}]
        if self.encrypt_reasoning:
            item.data["encrypted_content"] = encode_reasoning(text)
        base = {"item_id": item.data["id"], "output_index": item.index, "summary_index": 0}
        self._emit("response.reasoning_summary_text.done", **base, text=text)
        self._emit("response.reasoning_summary_part.done", **base, part={"type": "summary_text", "text": text})
        self._emit("response.output_item.done", output_index=item.index, item=item.data)
        self.closed.add(item.index)

    def _text_delta(self, part_type: str, text: str) -> None:
        self._close_reasoning()
        if self.message is None:
            self.message = self._new_item("message", {**message_item(new_id("msg_"), "", "completed"), "content": []})
        msg = self.message
        if not msg.parts or msg.parts[-1][0] != part_type:
            if msg.parts:
                self._close_part(msg, len(msg.parts) - 1)
            msg.parts.append((part_type, []))
            empty = ({"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                     if part_type == "output_text" else {"type": "refusal", "refusal": ""})
            self._emit("response.content_part.added", item_id=msg.data["id"], output_index=msg.index,
                       content_index=len(msg.parts) - 1, part=empty)
        if not text:
            return
        msg.parts[-1][1].append(text)
        base = {"item_id": msg.data["id"], "output_index": msg.index, "content_index": len(msg.parts) - 1}
        if part_type == "output_text":
            self._emit("response.output_text.delta", **base, delta=text, logprobs=[])
        else:
            self._emit("response.refusal.delta", **base, delta=text)

    def _close_part(self, msg: _Item, index: int) -> None:
        kind, pieces = msg.parts[index]
        text = "".join(pieces)
        base = {"item_id": msg.data["id"], "output_index": msg.index, "content_index": index}
        if kind == "output_text":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._emit("response.output_text.done", **base, text=text, logprobs=[])
        else:
            part = {"type": "refusal", "refusal": text}
            self._emit("response.refusal.done", **base, refusal=text)
        self._emit("response.content_part.done", **base, part=part)
        msg.data["content"].append(part)
        msg.done_parts += 1

    def _close_message(self, status: str) -> None:
        msg = self.message
        if msg is None or msg.index in self.closed:
            return
        for i in range(msg.done_parts, len(msg.parts)):
            self._close_part(msg, i)
        msg.data["status"] = status
        self._emit("response.output_item.done", output_index=msg.index, item=msg.data)
        self.closed.add(msg.index)

    def _call_delta(self, call: ChatToolCall) -> None:
        index = len(self.calls) if call.index is None else call.index
        fn = call.function or ChatFunction()
        item = self.calls.get(index)
        if item is None:
            self._close_reasoning()
            self._close_message("completed")
            name = fn.name or ""
            data = self.tools.call_item(name, call.id or new_id("call_"), "", call_item_id(self.tools, name),
                                        "completed")
            item = self._new_item(data["type"], data)
            item.parts.append(("arguments", []))
            self.calls[index] = item
        if fn.arguments:
            item.parts[0][1].append(fn.arguments)
            if item.kind == "function_call":  # a custom tool's input is JSON-wrapped: sent whole at the end
                self._emit("response.function_call_arguments.delta", item_id=item.data["id"],
                           output_index=item.index, delta=fn.arguments)

    # -- the end ------------------------------------------------------------------------------

    def _close_all(self, status: str) -> None:
        """Send the `.done` events of every item still open, in output order."""
        for item in self.items:
            if item is self.reasoning:
                self._close_reasoning()
            elif item is self.message:
                self._close_message(status)
            elif item.index not in self.closed:
                item.data["status"] = status
                base = {"item_id": item.data["id"], "output_index": item.index}
                if item.kind == "custom_tool_call":
                    item.data["input"] = text = custom_input("".join(item.parts[0][1]))
                    if text:
                        self._emit("response.custom_tool_call_input.delta", **base, delta=text)
                    self._emit("response.custom_tool_call_input.done", **base, input=text)
                else:
                    item.data["arguments"] = "".join(item.parts[0][1])
                    self._emit("response.function_call_arguments.done", **base, name=item.data["name"],
                               arguments=item.data["arguments"])
                self._emit("response.output_item.done", output_index=item.index, item=item.data)
                self.closed.add(item.index)

    def _finish(self) -> None:
        if self.finish_reason is None:
            self._fail("upstream_incomplete", "the upstream stream ended before the model finished")
            return
        status = "incomplete" if self.finish_reason in ("length", "content_filter") else "completed"
        self._close_all(status)
        if not self.items:  # a turn with no output at all still yields one (empty) message
            self._text_delta("output_text", "")
            self._close_message(status)
        self.response["output"] = [it.data for it in self.items]
        finish(self.response, self.finish_reason, self.usage)
        self.ended = True
        terminal = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        self._emit(terminal, response=self.response)
