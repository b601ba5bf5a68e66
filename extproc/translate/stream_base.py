"""What both stream translators share: SSE decoded as it arrives, output collected, one ending.

`replay` translates an answer the upstream sent whole (a JSON body although the client asked for a
stream) the same way: the answer is first written as the upstream's own stream that would have
carried it, then fed through the translator, so the client gets the complete stream it asked for.

An upstream event without the shape a translator needs (`BadUpstream`) ends the client's stream
the way any upstream failure does: an error event and the terminal event, never a cut stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.errors import BadUpstream
from extproc.translate.common import json_type, upstream_failure
from extproc.translate.sse import SSEDecoder
from extproc.translate.wire import ChatChunk, ChunkChoice, decode


def event_json(data: str) -> dict[str, Any]:
    """One upstream stream event's JSON object, for a translator that reads events as dicts (the
    Chat Completions <-> Responses ones decode theirs into `wire` models)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadUpstream("stream event", "is not JSON") from None
    if not isinstance(doc, dict):
        raise BadUpstream("stream event", f"is {json_type(doc)}, expected an object")
    return doc


class SSETranslator:
    """Subclasses handle one upstream event (`_event`), write a whole answer as upstream events
    (`_as_stream`), end a stream that stopped early (`_end_early`) and end one with an error (`_fail`)."""

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.ended = False
        self.out: list[bytes] = []
        self.upstream_model: str | None = None  # the model the upstream's stream named (its GenAI response model)

    def feed(self, data: bytes) -> bytes:
        for ev in self.decoder.feed(data):
            self._handle(ev.data)
        return self._take()

    def close(self) -> bytes:
        for ev in self.decoder.close():
            self._handle(ev.data)
        if not self.ended:
            self._end_early()
        return self._take()

    def replay(self, doc: dict[str, Any]) -> bytes:
        """A complete upstream answer, translated as the stream that would have carried it."""
        return self.feed(self._as_stream(doc)) + self.close()

    def fail(self, code: str, message: str) -> bytes:
        """End the stream now with an error; returns the bytes for the client."""
        self._fail(code, message)
        return self._take()

    def _handle(self, data: str) -> None:
        if self.ended:
            return
        try:
            self._event(data)
        except BadUpstream as e:
            self._fail(e.code or "bad_upstream_response", e.message)

    def _take(self) -> bytes:
        out, self.out = b"".join(self.out), []
        return out

    def _event(self, data: str) -> None:
        raise NotImplementedError

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _end_early(self) -> None:
        raise NotImplementedError

    def _fail(self, code: str, message: str) -> None:
        raise NotImplementedError


class ChatChunkReader(SSETranslator):
    """For the translators that read a chat.completion.chunk stream: `[DONE]` ends it (`_finish`), an
    error chunk fails it, and every other chunk, checked whole before any event is sent, goes to `_chunk_in`, then its
    first choice to `_choice`."""

    def _event(self, data: str) -> None:
        if data.strip() == "[DONE]":
            self._finish()
            return
        chunk = decode(data, ChatChunk, "stream event")
        if chunk.error is not None:
            self._fail(*upstream_failure(chunk.error, "upstream error"))
            return
        self._chunk_in(chunk)
        for choice in chunk.choices or ():
            if not choice.index:  # only choice 0 is streamed
                self._choice(choice)

    def _chunk_in(self, chunk: ChatChunk) -> None:
        """A chunk's own fields (model, usage), before its choices."""
        raise NotImplementedError

    def _choice(self, choice: ChunkChoice) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError
