"""Token usage of every exchange, from whichever shape the upstream reported it in, else estimated.

Sans-IO. Real usage is never overwritten; when an upstream reports none (some local servers), the
counts are estimated at about 4 bytes of text per token and marked `estimated`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.envoy.names import Key
from extproc.translate.sse import SSEDecoder

BYTES_PER_TOKEN = 4
_SCAN_LIMIT = 16 * 1024 * 1024  # a non-streamed body larger than this is estimated, not parsed
# Text fields of chat chunks, Responses events and bodies: what an estimate counts.
_TEXT_RE = re.compile(rb'"(?:content|delta|text|arguments|refusal|reasoning_content)"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    def as_metadata(self) -> dict[str, Any]:
        """As the dynamic metadata Envoy's access log prints (keys as json_to_metadata writes them)."""
        return {Key.INPUT_TOKENS: self.input_tokens, Key.OUTPUT_TOKENS: self.output_tokens,
                Key.CACHED_TOKENS: self.cached_tokens, Key.REASONING_TOKENS: self.reasoning_tokens,
                Key.USAGE_ESTIMATED: self.estimated}


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _detail(u: dict[str, Any], details: str, key: str) -> int:
    found = u.get(details)
    return _int(found.get(key)) if isinstance(found, dict) else 0


def parse_usage(u: Any) -> Usage | None:
    """Chat (`prompt_tokens`...), Responses (`input_tokens`...) or Messages usage; a value of the wrong type
    counts as none (an answer passed through is the upstream's, and is never failed for it)."""
    if not isinstance(u, dict):
        return None
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:  # Anthropic: cached input apart
        cached = _int(u.get("cache_read_input_tokens"))
        return Usage(_int(u.get("input_tokens")) + _int(u.get("cache_creation_input_tokens")) + cached,
                     _int(u.get("output_tokens")), cached)
    if "input_tokens" in u or "output_tokens" in u:
        return Usage(_int(u.get("input_tokens")), _int(u.get("output_tokens")),
                     _detail(u, "input_tokens_details", "cached_tokens"),
                     _detail(u, "output_tokens_details", "reasoning_tokens"))
    if "prompt_tokens" in u or "completion_tokens" in u:
        return Usage(_int(u.get("prompt_tokens")), _int(u.get("completion_tokens")),
                     _detail(u, "prompt_tokens_details", "cached_tokens"),
                     _detail(u, "completion_tokens_details", "reasoning_tokens"))
    return None


def usage_of(doc: Any) -> Usage | None:
    """Usage in a response body or stream event: top level, or inside `response` (Responses events)."""
    if not isinstance(doc, dict):
        return None
    found = parse_usage(doc.get("usage"))
    if found is None and isinstance(doc.get("response"), dict):
        found = parse_usage(doc["response"].get("usage"))
    return found


def model_of(doc: Any) -> str | None:
    """The model an answer names (the GenAI metrics' response model): a chat completion's or chunk's, a
    Response's or a Messages answer's `model`, or inside `response` (Responses events) or `message`
    (Anthropic's message_start)."""
    if not isinstance(doc, dict):
        return None
    for where in (doc, doc.get("response"), doc.get("message")):
        model = where.get("model") if isinstance(where, dict) else None
        if isinstance(model, str) and model:
            return model
    return None


def text_bytes(raw: bytes) -> int:
    return sum(len(m) for m in _TEXT_RE.findall(raw))


def request_text_bytes(body: dict[str, Any]) -> int:
    """About how much text a request sends the model (messages or input, instructions, tools)."""
    total = 0
    for key in ("messages", "input", "instructions", "tools", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            total += len(value.encode())
        elif value is not None:
            raw = orjson.dumps(value)
            total += text_bytes(raw) + (len(raw) if key == "tools" else 0)
    return total


def estimate(request_bytes: int, output_bytes: int) -> Usage:
    return Usage(-(-request_bytes // BYTES_PER_TOKEN), -(-output_bytes // BYTES_PER_TOKEN), estimated=True)


class UsageScanner:
    """Watches a passed-through answer for its usage without changing it.

    Streams go through the SSE decoder and only events that mention usage are parsed; a JSON body is
    kept and parsed once at its end. Output text is counted on the way, for an estimate.
    """

    def __init__(self, sse: bool):
        self.decoder = SSEDecoder() if sse else None
        self.body: list[bytes] = []
        self.size = 0
        self.output_bytes = 0
        self.chunks = 0
        self.usage: Usage | None = None
        self.model: str | None = None  # the model the answer named, where it was read for its usage

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.chunks += 1
        if self.decoder is None:
            self.size += len(chunk)
            if self.size <= _SCAN_LIMIT:
                self.body.append(chunk)
            else:
                self.output_bytes += text_bytes(chunk)
            return
        for ev in self.decoder.feed(chunk):
            data = ev.data.encode()
            if b'"usage"' in data:
                with contextlib.suppress(orjson.JSONDecodeError):
                    doc = orjson.loads(data)
                    self.usage = usage_of(doc) or self.usage
                    self.model = model_of(doc) or self.model
            if b'"response.completed"' not in data and b'"response.incomplete"' not in data:
                self.output_bytes += text_bytes(data)  # terminal events repeat the whole output

    def finish(self) -> None:
        if self.body:
            raw = b"".join(self.body)
            self.body = []
            try:
                doc = orjson.loads(raw)
                self.usage, self.model = usage_of(doc), model_of(doc)
            except orjson.JSONDecodeError:
                self.usage = None
            if self.usage is None:
                self.output_bytes += text_bytes(raw)
