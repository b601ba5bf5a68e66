"""The Chat Completions stream written for any upstream stream: the chunk envelope and the error
ending kept in one place for the translators that answer a chat client (from Responses or Messages)."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.translate.common import now
from extproc.translate.sse import DONE, encode
from extproc.translate.stream_base import SSETranslator


class ChatStream(SSETranslator):
    """Subclasses read their upstream's events and write each delta as a chunk (`_chunk`); the id,
    model and creation time start as placeholders and are set once the upstream names them."""

    def __init__(self, request: dict[str, Any], model: str):
        super().__init__()
        opts = request.get("stream_options")
        self.include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        self.id = "chatcmpl-pending"
        self.model = model
        self.created = now()

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> None:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "system_fingerprint": None,
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None
        self.out.append(encode(orjson.dumps(chunk)))

    def _fail(self, code: str, message: str) -> None:
        """An error chunk (the chat SDKs raise it) and the end of the stream."""
        if not self.ended:
            self.ended = True
            err = {"message": message, "type": "server_error", "param": None, "code": code}
            self.out.append(encode(orjson.dumps({"error": err})))
            self.out.append(DONE)
