"""The Conversations API, held by the sidecar (or pinned to the backend that holds it), and the
`conversation` of a turn (sans-IO).

A conversation is one record per tenant and id (`conv:<tenant>:<id>`: its `created_at`, `metadata`
and every item in order), in the configured store, so any replica answers it and another tenant's
id reads as unknown (404), like a response's. The sidecar never sends its own conversation ids to a
backend, so no owner record is needed to tell tenants apart. Paths (`route`) and their answers
(`Conversations.call`) follow OpenAI's reference: create with up to 20 items, retrieve, update the
metadata (16 pairs, 64-character keys, 512-character values), delete; list items (`after`, `limit`
1-100, `order` desc by default), add up to 20, retrieve and delete one.

With a backend declared `conversations: passthrough` (at most one: a create call names no model),
`POST /v1/conversations` goes to it and the answer's id is pinned to its instance for the caller's
tenant (`convpin:<tenant>:<id>`, `pin_writes`); every later call on that id, and a turn naming it,
passes through to that instance untouched (`Conversations.call` and `read` return the `Pin`). The pin
is the tenant's: another tenant finds neither record nor pin, a 404 that reaches no backend. A delete
the backend answers with success removes the pin (`forgotten`).

`POST /v1/responses` with `conversation` (an id or `{"id": ...}`) reads the record (`read`): its
items are the turn's history, and the turn's input and output items are appended when its answer
ends (`Held.append`, from the plan the request side built). The record is read when the turn starts and written when it ends: two
turns of one conversation at the same time keep only the later one's items.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.errors import GatewayError, invalid
from extproc.state.lookup import Decision, Reads, Values
from extproc.state.pinning import state_unavailable
from extproc.state.records import Pin, input_items, input_items_page
from extproc.translate.common import new_id, now
from extproc.translate.sse import SSEDecoder

log = logging.getLogger("extproc")

PATH = "/v1/conversations"
_ID = r"([A-Za-z0-9_.:-]{1,200})"
_ROUTE_RE = re.compile(rf"^/v1/conversations(?:/{_ID}(/items(?:/{_ID})?)?)?$")
MAX_ITEMS_PER_CALL = 20
MAX_METADATA_PAIRS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512
Writes = list[tuple[str, bytes | None]]


def conversation_key(tenant: str, conversation_id: str) -> str:
    return f"conv:{tenant}:{conversation_id}"


def pin_key(tenant: str, conversation_id: str) -> str:
    """Where a backend's conversation lives, for the tenant that created it through the gateway."""
    return f"convpin:{tenant}:{conversation_id}"


def pin_writes(tenant: str, conversation_id: str, pin: Pin) -> Writes:
    """A created conversation's id pinned to the instance that answered (`pinning.IdRecorder`)."""
    return [(pin_key(tenant, conversation_id), pin.dumps())]


def forgotten(tenant: str, method: str, where: Route) -> Writes:
    """What the backend's success at a call passed through to it removes: the pin, when the call deleted
    the conversation itself (not one of its items), so a later call on the id is the unknown id's 404
    and reaches no backend."""
    if method == "DELETE" and where.conversation_id is not None and not where.items:
        return [(pin_key(tenant, where.conversation_id), None)]
    return []


@dataclass(frozen=True, slots=True)
class Route:
    """Which Conversations path a request names."""

    conversation_id: str | None = None  # None: POST /v1/conversations
    items: bool = False
    item_id: str | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        if self.conversation_id is None:
            return ("POST",)
        if self.item_id is not None:
            return ("GET", "DELETE")
        return ("GET", "POST") if self.items else ("GET", "POST", "DELETE")


def route(path: str) -> Route | None:
    """The Conversations path of `path` (query string ignored), or None for any other path."""
    found = _ROUTE_RE.match(path.partition("?")[0])
    if found is None:
        return None
    return Route(found.group(1), found.group(2) is not None, found.group(3))


def allowed_methods(path: str) -> tuple[str, ...] | None:
    r = route(path)
    return r.methods if r is not None else None


@dataclass(slots=True)
class Record:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]] = field(default_factory=list)

    def dumps(self) -> bytes:
        return orjson.dumps({"id": self.id, "created_at": self.created_at, "metadata": self.metadata,
                             "items": self.items})

    @staticmethod
    def loads(raw: bytes | None) -> Record | None:
        if raw is None:
            return None
        try:
            doc = orjson.loads(raw)
            return Record(doc["id"], doc["created_at"], doc["metadata"], doc["items"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    def resource(self) -> dict[str, Any]:
        """The `conversation` object the API returns."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


@dataclass(slots=True)
class Reply:
    """The sidecar's own answer to a Conversations call, and the store writes it makes."""

    status: int
    body: bytes
    writes: Writes = field(default_factory=list)


def not_found(conversation_id: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, f"Conversation with id '{conversation_id}' not found.", param=param,
                        code="conversation_not_found")


def _keys(tenant: str, conversation_id: str) -> Reads:
    return Reads((conversation_key(tenant, conversation_id), pin_key(tenant, conversation_id)))


def loaded(conversation_id: str, values: Values, param: str | None = None) -> Record | Pin:
    """What a read of `_keys` found: the sidecar's record, or the pin of a backend's conversation; the
    store down is a 503, neither (none of this tenant's) a 404."""
    if values is None:
        raise state_unavailable()
    found = Record.loads(values[0]) or (Pin.loads(values[1]) if values[1] is not None else None)
    if found is None:
        raise not_found(conversation_id, param)
    return found


def check_metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata limits: up to 16 pairs, string keys up to 64 characters, string values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("metadata", "expected an object of string keys and values")
    if len(value) > MAX_METADATA_PAIRS:
        raise invalid("metadata", f"expected at most {MAX_METADATA_PAIRS} key-value pairs, got {len(value)}")
    for key, v in value.items():
        if len(key) > MAX_KEY_CHARS:
            raise invalid("metadata", f"key '{key[:MAX_KEY_CHARS]}...' is longer than {MAX_KEY_CHARS} characters")
        if not isinstance(v, str):
            raise invalid(f"metadata.{key}", "expected a string value")
        if len(v) > MAX_VALUE_CHARS:
            raise invalid(f"metadata.{key}", f"expected a string of at most {MAX_VALUE_CHARS} characters")
    return dict(value)


def _new_items(value: Any, param: str, held: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(param, "expected a list of items")
    if len(value) > MAX_ITEMS_PER_CALL:
        raise invalid(param, f"expected at most {MAX_ITEMS_PER_CALL} items, got {len(value)}")
    return unique(held, input_items(value, param), param)


def unique(held: Sequence[dict[str, Any]], added: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """`added` (items the client sent, its ids kept) when no id is already held or given twice: OpenAI
    refuses such an item, since item ids are how a conversation's items are retrieved and deleted."""
    seen = {item.get("id") for item in held}
    for item in added:
        if item["id"] in seen:
            raise GatewayError(400, f"Duplicate item found with id {item['id']}. Remove duplicate items from "
                                    "your input and try again.", param=param)
        seen.add(item["id"])
    return added


def _body(body: dict[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    body = body or {}
    for key in body:
        if key not in allowed:
            raise GatewayError(400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
    return body


def _page(items: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                         "last_id": items[-1]["id"] if items else None, "has_more": False})


def _bounded(record: Record, max_record_bytes: int, param: str | None = None) -> bytes:
    """The record's bytes, unless they pass the gateway's limit: then the call that grows it is refused."""
    raw = record.dumps()
    if len(raw) > max_record_bytes:
        raise GatewayError(400, f"Conversation '{record.id}' would exceed the gateway's limit of "
                                f"{max_record_bytes} bytes", param=param, code="conversation_too_large")
    return raw


class Conversations:
    """One Conversations API call of one tenant."""

    def __init__(self, tenant: str, max_record_bytes: int):
        self.tenant = tenant
        self.max_record_bytes = max_record_bytes

    def call(self, method: str, where: Route, query: str, body: dict[str, Any] | None) -> Decision[Reply | Pin]:
        """The sidecar's answer, or the pin of a backend's conversation the call passes through to."""
        if where.conversation_id is None:
            return self._create(body)
        cid = where.conversation_id
        found = loaded(cid, (yield _keys(self.tenant, cid)))
        return found if isinstance(found, Pin) else self._on(method, where, query, body, found)

    def _write(self, record: Record) -> Writes:
        return [(conversation_key(self.tenant, record.id), _bounded(record, self.max_record_bytes))]

    def _create(self, body: dict[str, Any] | None) -> Reply:
        body = _body(body, ("items", "metadata", "safety_identifier"))
        record = Record(new_id("conv_"), now(), check_metadata(body.get("metadata")), _new_items(body.get("items"), "items"))
        return Reply(200, orjson.dumps(record.resource()), self._write(record))

    def _on(self, method: str, where: Route, query: str, body: dict[str, Any] | None, record: Record) -> Reply:
        if where.item_id is not None:
            return self._item(method, where.item_id, record)
        if where.items:
            if method == "GET":
                return Reply(200, input_items_page(record.items, query))
            added = _new_items(_body(body, ("items",)).get("items"), "items", record.items)
            if not added:
                raise GatewayError(400, "Missing required parameter: 'items'.", param="items",
                                   code="missing_required_parameter")
            record.items.extend(added)
            return Reply(200, _page(added), self._write(record))
        if method == "GET":
            return Reply(200, orjson.dumps(record.resource()))
        if method == "DELETE":
            return Reply(200, orjson.dumps({"id": record.id, "object": "conversation.deleted", "deleted": True}),
                         [(conversation_key(self.tenant, record.id), None)])
        update = _body(body, ("metadata",))
        if "metadata" not in update:
            raise GatewayError(400, "Missing required parameter: 'metadata'.", param="metadata",
                               code="missing_required_parameter")
        record.metadata = check_metadata(update["metadata"])
        return Reply(200, orjson.dumps(record.resource()), self._write(record))

    def _item(self, method: str, item_id: str, record: Record) -> Reply:
        found = next((n for n, item in enumerate(record.items) if item.get("id") == item_id), None)
        if found is None:
            raise GatewayError(404, f"Item with id '{item_id}' not found.", code="item_not_found")
        if method == "GET":
            return Reply(200, orjson.dumps(record.items[found]))
        del record.items[found]
        return Reply(200, orjson.dumps(record.resource()), self._write(record))


# -- `conversation` on POST /v1/responses ------------------------------------------------------------

def conversation_id(value: Any) -> str:
    """The id of a create call's `conversation`: a string, or an object with `id`."""
    cid = value.get("id") if isinstance(value, dict) else value
    if not isinstance(cid, str) or not cid:
        raise invalid("conversation", "expected a conversation id or an object with its 'id'")
    return cid


def read(tenant: str, body: dict[str, Any]) -> Decision[Record | Pin]:
    """The conversation a `POST /v1/responses` names (not with `previous_response_id`), this tenant's:
    the sidecar's record, or the pin of the backend that holds it."""
    if body.get("previous_response_id") is not None:
        raise GatewayError(400, "Mutually exclusive parameters: 'previous_response_id' and 'conversation'. "
                                "Ensure you are only providing one of: 'previous_response_id' or 'conversation'.",
                           param="conversation", code="mutually_exclusive_parameters")
    cid = conversation_id(body["conversation"])
    return loaded(cid, (yield _keys(tenant, cid)), "conversation")


@dataclass(frozen=True, slots=True)
class Held:
    """The conversation a turn continues, as read when the turn started, and the turn's own input:
    appended with the answer's output when the answer ends."""

    record: Record
    tenant: str
    max_record_bytes: int
    input: list[dict[str, Any]]

    @staticmethod
    def turn(record: Record, tenant: str, max_record_bytes: int, items: list[dict[str, Any]]) -> Held:
        """A turn's `input` items in `record`, refused before any upstream call when one repeats a held
        item's id, or when the conversation with them already passes the limit (the answer would not be
        appended)."""
        _bounded(Record(record.id, record.created_at, record.metadata, [*record.items, *items]), max_record_bytes,
                 "input")
        return Held(record, tenant, max_record_bytes, unique(record.items, items, "input"))

    def append(self, response: dict[str, Any] | None) -> Writes:
        """The record with this turn's input and output, once the answer is complete; compaction
        triggers are not kept (the compaction item they asked for is)."""
        if response is None or response.get("status") not in ("completed", "incomplete"):
            return []
        kept = [i for i in self.input if i.get("type") != "compaction_trigger"]
        record = Record(self.record.id, self.record.created_at, self.record.metadata,
                        [*self.record.items, *kept, *(response.get("output") or ())])
        raw = record.dumps()
        if len(raw) > self.max_record_bytes:  # the answer's output passed the limit (its input did not)
            log.warning("conversation %s not extended: %d bytes exceeds state.max_record_bytes", record.id, len(raw))
            return []
        return [(conversation_key(self.tenant, record.id), raw)]


_TERMINAL = ('"response.completed"', '"response.incomplete"')


class AnswerReader:
    """The Response of an answer passed through from a Responses backend, read on the way without
    changing it: a JSON body whole (up to `limit` bytes), or a stream's terminal event."""

    def __init__(self, sse: bool, limit: int):
        self.decoder = SSEDecoder() if sse else None
        self.limit = limit
        self.body: list[bytes] = []
        self.size = 0
        self.response: dict[str, Any] | None = None

    def feed(self, chunk: bytes, end_of_stream: bool) -> None:
        if self.decoder is None:
            self.size += len(chunk)
            if self.size <= self.limit:
                self.body.append(chunk)
            if end_of_stream and self.size <= self.limit:
                self._found(b"".join(self.body), None)
            return
        for ev in [*self.decoder.feed(chunk), *(self.decoder.close() if end_of_stream else ())]:
            if any(kind in ev.data[:200] for kind in _TERMINAL):
                self._found(ev.data.encode(), "response")

    def _found(self, raw: bytes, inside: str | None) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        doc = doc.get(inside) if inside is not None and isinstance(doc, dict) else doc
        if isinstance(doc, dict) and isinstance(doc.get("output"), list):
            self.response = doc
