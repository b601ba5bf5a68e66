"""Compaction asked for inside `POST /v1/responses` (newer Codex CLI), on a chat-only backend (sans-IO).

A request whose last input item is `{"type": "compaction_trigger"}` asks the model to compact the
context instead of answering: the Response's output holds exactly one `compaction` item. A
Responses backend does that itself (the request passes through). For a chat backend the sidecar
makes the same sealed item as `/v1/responses/compact` (`compact.py`): one chat completion writes
the summary, and the answer is a whole Response (streamed: `response.created`, `in_progress`,
the item's `added` and `done`, `completed`). A trigger anywhere but last is refused, as OpenAI does.

A Responses backend that answers `/v1/responses/compact` with 404 (some OpenAI accounts) gets the
same compaction in this form (`CompactAsTurn`, the retry of `exchange/first_contact.py`): the input
and a final trigger as a `store: false` turn, its one compaction item answered as `/compact` answers.

A context rebuilt from held items (earlier turns, a conversation) is cut at its latest compaction
item as the compacted window reads: the user messages before it, then the item and what follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.api import CHAT, RESPONSES
from extproc.config import Backend
from extproc.errors import GatewayError, bad_upstream
from extproc.state.records import input_items
from extproc.translate import compact
from extproc.translate.common import new_id, now
from extproc.translate.pairs import Answer, StreamTranslator
from extproc.translate.resp_chat_to_responses import response_shell
from extproc.translate.sse import encode
from extproc.translate.stream_base import SSETranslator, event_json
from extproc.translate.wire import ChatUsage

TRIGGER = "compaction_trigger"
# The compact body's fields a turn takes as they are (the cache and image hints are compact's own).
TURN_FIELDS = ("model", "previous_response_id", "instructions", "prompt_cache_key", "service_tier")


def _kind(item: Any) -> Any:
    return item.get("type") if isinstance(item, dict) else None


def triggered(body: dict[str, Any]) -> bool:
    """Whether the request asks for compaction; a 400 naming the item when a trigger is not the last."""
    inp = body.get("input")
    if not isinstance(inp, list):
        return False
    for n, item in enumerate(inp):
        if _kind(item) == TRIGGER and n != len(inp) - 1:
            raise GatewayError(400, "The 'compaction_trigger' item must be the final input item.",
                               param=f"input[{n}]", code="invalid_value")
    return bool(inp) and _kind(inp[-1]) == TRIGGER


def window(items: list[Any]) -> list[Any]:
    """Held items as the model's context: triggers dropped (they asked for what the compaction item
    is), and before the latest compaction item only the user messages, as `/compact` keeps them."""
    items = [i for i in items if _kind(i) != TRIGGER]
    last = max((n for n, i in enumerate(items) if _kind(i) == "compaction"), default=None)
    if last is None:
        return items
    kept = [i for i in items[:last] if _kind(i) in ("message", None) and i.get("role") == "user"]
    return [*kept, *items[last:]]


def held_context(prior: list[Any], sealer: compact.Sealer, tenant: str, chat_backend: bool) -> list[Any]:
    """The held history a request continues (earlier turns, a conversation's items), cut to its
    compacted window, with the sidecar's own compaction items opened into their summaries."""
    cut = window(prior)
    return compact.open_items(cut, sealer, tenant, chat_backend) or cut


@dataclass(slots=True)
class TriggerOnChat:
    """A `compaction_trigger` request for a chat-only model: the summary by one chat completion, the
    answer a Response whose output is the sealed compaction item. The held conversation (earlier turns
    included) arrives merged into `input`, like any Responses turn."""

    request_body: dict[str, Any]
    backend: Backend
    sealer: compact.Sealer
    tenant: str
    client_api: str = RESPONSES
    upstream_api: str = CHAT
    dropped_tools: list[str] = field(default_factory=list)
    dropped_fields: list[str] = field(default_factory=list)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        items = [i for i in input_items(body.get("input")) if i["type"] != TRIGGER]
        return compact.chat_request(body, items, self.backend.chat_max_tokens_field)

    def compacted(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The completed Response for a summary completion (a 502 when it holds no summary)."""
        resource = compact.compaction_resource(chat, [], self.sealer, self.tenant)
        response = response_shell(self.request_body, new_id("resp_"), now())
        response.update(status="completed", completed_at=now(), output=resource["output"], usage=resource["usage"])
        return response

    def response(self, doc: dict[str, Any]) -> Answer:
        response = self.compacted(doc)
        return Answer(response, response)

    def stream(self) -> StreamTranslator:
        return CompactionStream(self)


@dataclass(slots=True)
class CompactAsTurn:
    """`/v1/responses/compact` for a Responses backend that lacks the endpoint: the same compaction as a
    `POST /v1/responses` whose input ends with the trigger (`store: false`, not streamed), its answer's
    one compaction item returned in `/compact`'s shape (`response.compaction`: the input's user
    messages, then the item; a `previous_response_id`'s earlier user messages are the backend's, not
    repeated)."""

    client_api: str = RESPONSES
    upstream_api: str = RESPONSES
    dropped_tools: list[str] = field(default_factory=list)
    dropped_fields: list[str] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)  # the input's user messages, with ids

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        inp = body.get("input")
        self.kept = [i for i in input_items(inp) if i["type"] == "message" and i.get("role") == "user"]
        items = [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp or [])
        turn = {k: body[k] for k in TURN_FIELDS if body.get(k) is not None}
        return {**turn, "input": [*items, {"type": TRIGGER}], "store": False}

    def response(self, doc: dict[str, Any]) -> Answer:
        output = doc.get("output")
        found = [i for i in output if _kind(i) == "compaction"] if isinstance(output, list) else []
        if len(found) != 1:
            raise bad_upstream(f"the compaction_trigger turn's output holds {len(found)} compaction items, not one")
        rid, created, usage = doc.get("id"), doc.get("created_at"), doc.get("usage")
        return Answer({"id": rid if isinstance(rid, str) else new_id("resp_"), "object": "response.compaction",
                       "created_at": created if isinstance(created, int) else now(),
                       "output": [*self.kept, found[0]],
                       "usage": usage if isinstance(usage, dict) else ChatUsage().as_responses()})

    def stream(self) -> StreamTranslator:
        raise GatewayError(400, "compaction answers are not streamed", code="unsupported_parameter")


class CompactionStream(SSETranslator):
    """The streamed form: the summary completion (one JSON answer) as the Responses event lifecycle of
    a Response with one output item."""

    def __init__(self, pair: TriggerOnChat):
        super().__init__()
        self.pair = pair
        self.seq = 0
        self.response: dict[str, Any] | None = None  # the final Response, once completed
        self.shell = response_shell(pair.request_body, new_id("resp_"), now())
        self.started = False

    def _emit(self, kind: str, **fields: Any) -> None:
        self.out.append(encode(orjson.dumps({"type": kind, "sequence_number": self.seq, **fields}), kind))
        self.seq += 1

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self._emit("response.created", response=self.shell)
            self._emit("response.in_progress", response=self.shell)

    def _as_stream(self, doc: dict[str, Any]) -> bytes:
        return encode(orjson.dumps(doc))

    def _event(self, data: str) -> None:
        if data.strip() == "[DONE]":
            return
        done = {**self.pair.compacted(event_json(data)), "id": self.shell["id"], "created_at": self.shell["created_at"]}
        self._start()
        item = done["output"][0]
        self._emit("response.output_item.added", output_index=0, item=item)
        self._emit("response.output_item.done", output_index=0, item=item)
        self.ended = True
        self.response = done
        self._emit("response.completed", response=done)

    def _end_early(self) -> None:
        self._fail("upstream_incomplete", "the upstream ended before the summary was written")

    def _fail(self, code: str, message: str) -> None:
        if self.ended:
            return
        self._start()
        self.ended = True
        self._emit("error", error={"type": "server_error", "code": code, "message": message, "param": None})
        self._emit("response.failed", response={**self.shell, "status": "failed",
                                                "error": {"code": code, "message": message}})
