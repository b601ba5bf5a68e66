"""Responses state the sidecar keeps: pins (which instance produced a response id) and whole turns.

Sans-IO: records in and out as bytes, no store access. Two kinds of record, keyed by tenant and
response id, and the owner of each id under the id alone (the decisions that use them are in
`state.pinning`):

- pin: `{"backend", "endpoint"}` for every response a Responses backend produced through the sidecar,
  so `previous_response_id` and `/v1/responses/{id}...` reach the instance that holds that state;
- turn: a response the sidecar produced by translating to a chat backend (which keeps no state),
  with its input items and the ids of every earlier turn in its chain (`ancestors`), so a later
  `previous_response_id` rebuilds the whole conversation with one multi-get.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from extproc.errors import GatewayError, invalid
from extproc.translate.common import new_id

# /v1/responses/{id}, /v1/responses/{id}/cancel, /v1/responses/{id}/input_items
RESOURCE_RE = re.compile(r"^/v1/responses/([A-Za-z0-9_.:-]{1,200})(/cancel|/input_items)?$")


def pin_key(tenant: str, response_id: str) -> str:
    return f"pin:{tenant}:{response_id}"


def turn_key(tenant: str, response_id: str) -> str:
    return f"turn:{tenant}:{response_id}"


def owner_key(response_id: str) -> str:
    """Who made a response, whatever tenant asks: written with every pin and turn, so an id recorded
    for another tenant is refused before it reaches any upstream."""
    return f"owner:{response_id}"


def owner_write(tenant: str, response_id: str) -> tuple[str, bytes]:
    return owner_key(response_id), tenant.encode()


@dataclass(frozen=True, slots=True)
class Pin:
    backend: str
    endpoint: str | None

    def dumps(self) -> bytes:
        return orjson.dumps({"backend": self.backend, "endpoint": self.endpoint})

    @staticmethod
    def loads(raw: bytes) -> Pin | None:
        try:
            doc = orjson.loads(raw)
            return Pin(doc["backend"], doc.get("endpoint"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


def load_turn(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("response"), dict) else None


def _text_part(role: str, text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []} if role == "assistant" else {
        "type": "input_text", "text": text}


def input_items(inp: Any, param: str = "input") -> list[dict[str, Any]]:
    """A request's `input` as the list of items the API reports back (`input_items`): typed, with ids.
    `param` names the list in errors (a Conversations call's `items`)."""
    if isinstance(inp, str):
        inp = [{"role": "user", "content": inp}] if inp else []
    if not isinstance(inp, list | None):
        raise invalid(param, "expected a string or a list of input items")
    out = []
    for i, item in enumerate(inp or ()):
        if not isinstance(item, dict):
            raise invalid(f"{param}[{i}]", "expected an input item object")
        item = dict(item)
        kind = item.setdefault("type", "message")
        if not isinstance(kind, str):
            raise invalid(f"{param}[{i}].type", "expected an item type string")
        if kind == "message":
            role = item.get("role", "user")
            if isinstance(item.get("content"), str):
                item["content"] = [_text_part(role, item["content"])]
            item.setdefault("status", "completed")
        prefix = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}.get(kind, "item_")
        item.setdefault("id", new_id(prefix))
        out.append(item)
    return out


def turn_record(response: dict[str, Any], items: list[dict[str, Any]], ancestors: list[str],
                endpoint: str | None, backend: str | None = None) -> bytes:
    """`endpoint` and `backend` say who served the turn: a model group's next turn goes there first."""
    return orjson.dumps({"response": response, "input": items, "ancestors": ancestors, "endpoint": endpoint,
                         "backend": backend})


def history(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input then output items of each turn, oldest first: what a chat backend must be sent again."""
    items: list[dict[str, Any]] = []
    for turn in turns:
        items.extend(turn["input"])
        items.extend(turn["response"].get("output") or ())
    return items


def chain(turn: dict[str, Any], response_id: str) -> list[str]:
    """Ancestors of the next turn after this one."""
    return [*turn.get("ancestors", ()), response_id]


def previous_not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Previous response with id '{response_id}' not found.",
                        param="previous_response_id", code="previous_response_not_found")


def response_not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Response with id '{response_id}' not found.", code="response_not_found")


def deleted(response_id: str) -> bytes:
    return orjson.dumps({"id": response_id, "object": "response", "deleted": True})


def input_items_page(items: list[dict[str, Any]], query: str) -> bytes:
    """The `GET /v1/responses/{id}/input_items` list: `order` (desc by default), `after`, `limit` (1-100)."""
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(400, f"Invalid 'order': expected 'asc' or 'desc', got {order!r}", param="order",
                           code="invalid_value")
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise GatewayError(400, "Invalid 'limit': expected an integer between 1 and 100", param="limit",
                           code="invalid_value")
    data = items if order == "asc" else items[::-1]
    after = q.get("after")
    if after:
        ids = [it.get("id") for it in data]
        data = data[ids.index(after) + 1:] if after in ids else []
    page = data[:limit]
    return orjson.dumps({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit})
