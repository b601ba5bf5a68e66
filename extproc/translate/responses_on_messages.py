"""A Responses client's reasoning on a Messages backend, handed back to Anthropic with its signature.

The Responses client gets Claude's thinking as a reasoning item whose `encrypted_content` seals the
Anthropic blocks whole (`thinking` with its `signature`, `redacted_thinking`), as OpenAI's reasoning
items carry theirs; when the item comes back in `input` (replayed by a `store: false` client such as
Codex, or held by the sidecar for `previous_response_id`), the blocks open again and start the
assistant turn they belong to, which Anthropic requires of a tool loop with thinking. The envelope is
not a secret: Anthropic checks its own signatures.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from extproc.translate.sse import SSEDecoder, encode
from extproc.translate.stream_messages_to_chat import MessagesToChatStream

PREFIX = "extproc.t1."
_ASSISTANT_ITEMS = ("reasoning", "function_call", "custom_tool_call")
_NEUTRAL_ROLES = ("system", "developer")  # become `system`, not turns: they neither start nor end a turn


def seal(blocks: list[dict[str, Any]]) -> str:
    return PREFIX + base64.urlsafe_b64encode(orjson.dumps(blocks)).decode()


def unseal(value: Any) -> list[dict[str, Any]]:
    """The blocks an envelope holds; none for anything else (another reasoning item, or a damaged one)."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return []
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(value[len(PREFIX):]))
    except (ValueError, orjson.JSONDecodeError):
        return []
    if not isinstance(blocks, list):
        return []
    return [b for b in blocks if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")]


def thinking_runs(items: Any) -> list[list[dict[str, Any]]]:
    """The sealed blocks of each assistant turn of a Responses `input`, in order: a turn is a run of
    assistant messages, tool calls and reasoning items, as the chat shape merges them into one."""
    runs: list[list[dict[str, Any]]] = []
    in_turn = False
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        kind, role = item.get("type", "message"), item.get("role")
        if kind == "message" and role in _NEUTRAL_ROLES:
            continue
        if kind in _ASSISTANT_ITEMS or (kind == "message" and role == "assistant"):
            if not in_turn:
                runs.append([])
                in_turn = True
            if kind == "reasoning":
                runs[-1].extend(unseal(item.get("encrypted_content")))
        else:
            in_turn = False
    return runs


def seal_output(output: list[Any], blocks: list[dict[str, Any]]) -> None:
    """The turn's thinking blocks, sealed into its first reasoning item."""
    item = next((o for o in output if isinstance(o, dict) and o.get("type") == "reasoning"), None)
    if item is not None and blocks:
        item["encrypted_content"] = seal(blocks)


def blocks_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [b for b in content if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")] \
        if isinstance(content, list) else []


class SealThinking:
    """Wraps the Responses stream of a Messages upstream: each reasoning item, when done and in the
    terminal event, carries the thinking blocks the Messages stream has shown so far."""

    def __init__(self, inner: Any, source: MessagesToChatStream):
        self.inner, self.source = inner, source
        self.decoder = SSEDecoder()

    @property
    def response(self) -> dict[str, Any] | None:
        final: dict[str, Any] | None = self.inner.response
        if final is not None and isinstance(final.get("output"), list):
            seal_output(final["output"], self.source.thinking)
        return final

    @property
    def upstream_model(self) -> str | None:
        return self.source.upstream_model  # the Messages stream read from the upstream

    def _seal(self, raw: bytes, end: bool = False) -> bytes:
        out = []
        for ev in self.decoder.feed(raw) + (self.decoder.close() if end else []):
            doc = orjson.loads(ev.data)
            kind = doc.get("type")
            if kind == "response.output_item.done":
                seal_output([doc.get("item")], self.source.thinking)
            elif kind in ("response.completed", "response.incomplete") and isinstance(doc.get("response"), dict):
                seal_output(doc["response"].get("output") or [], self.source.thinking)
            out.append(encode(orjson.dumps(doc), ev.event))
        return b"".join(out)

    def feed(self, data: bytes) -> bytes:
        return self._seal(self.inner.feed(data))

    def close(self) -> bytes:
        return self._seal(self.inner.close(), end=True)

    def replay(self, doc: dict[str, Any]) -> bytes:
        self.source.thinking = blocks_of(doc)
        return self._seal(self.inner.replay(doc), end=True)

    def fail(self, code: str, message: str) -> bytes:
        return self._seal(self.inner.fail(code, message), end=True)
