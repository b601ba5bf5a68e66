"""Checks what the sidecar synthesises against the Open Responses schema and the streaming contract."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from extproc.translate.sse import SSEDecoder

SPEC = Path(__file__).parent / "data" / "openresponses-openapi.json"


@cache
def _spec() -> dict[str, Any]:
    spec = json.loads(SPEC.read_text())
    schemas = copy.deepcopy(spec["components"]["schemas"])
    # Known defect of this spec version: a json_schema text format's `schema` may only be null,
    # which no real request satisfies. Accept any JSON schema object there.
    schemas["JsonSchemaResponseFormat"]["properties"]["schema"] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    return {"components": {"schemas": schemas}}


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = {**_spec(), "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


@cache
def _event_schemas() -> dict[str, str]:
    out = {}
    for name, schema in _spec()["components"]["schemas"].items():
        if name.endswith("StreamingEvent"):
            out[schema["properties"]["type"]["enum"][0]] = name
    return out


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Every JSON event of a complete SSE body ([DONE] left out)."""
    d = SSEDecoder()
    return [json.loads(e.data) for e in d.feed(raw) + d.close() if e.data != "[DONE]"]


def validate(name: str, doc: Any) -> None:
    errors = sorted(_validator(name).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise AssertionError(f"{name} does not validate:\n" + "\n".join(
            f"  at {'/'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]))


def validate_response(doc: dict[str, Any]) -> None:
    validate("ResponseResource", doc)


TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def check_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Validate a whole Responses event stream: schemas, sequence numbers, item and part lifecycles.

    Returns the final response object.
    """
    schemas = _event_schemas()
    assert events, "empty stream"
    for i, ev in enumerate(events):
        assert ev.get("sequence_number") == i, f"event {i} has sequence_number {ev.get('sequence_number')}"
        if ev["type"] in schemas:
            validate(schemas[ev["type"]], ev)
    assert events[0]["type"] == "response.created", events[0]["type"]
    assert events[1]["type"] == "response.in_progress", events[1]["type"]
    rid = events[0]["response"]["id"]
    terminals = [e for e in events if e["type"] in TERMINAL]
    assert len(terminals) == 1, f"{len(terminals)} terminal events"
    assert events[-1] is terminals[0], "the terminal event must come last"
    open_items: dict[int, dict[str, Any]] = {}
    done_items: set[int] = set()
    open_parts: set[tuple[int, int]] = set()
    next_index = 0
    for ev in events[2:-1]:
        kind = ev["type"]
        if kind == "error":
            continue
        if kind == "response.output_item.added":
            assert ev["output_index"] == next_index, f"output_index {ev['output_index']} != {next_index}"
            next_index += 1
            open_items[ev["output_index"]] = ev["item"]
            continue
        idx = ev.get("output_index")
        assert idx in open_items, f"{kind} for output_index {idx} that is not open"
        item = open_items[idx]
        if "item_id" in ev:
            assert ev["item_id"] == item["id"], f"{kind}: item_id {ev['item_id']} != {item['id']}"
        if kind == "response.content_part.added":
            assert item["type"] == "message"
            open_parts.add((idx, ev["content_index"]))
        elif kind == "response.content_part.done":
            assert (idx, ev["content_index"]) in open_parts
            open_parts.discard((idx, ev["content_index"]))
        elif kind in ("response.output_text.delta", "response.output_text.done",
                      "response.refusal.delta", "response.refusal.done"):
            assert (idx, ev["content_index"]) in open_parts, f"{kind} outside an open content part"
        elif kind.startswith("response.function_call_arguments"):
            assert item["type"] == "function_call"
        elif kind.startswith("response.reasoning_summary"):
            assert item["type"] == "reasoning"
        elif kind == "response.output_item.done":
            assert not any(p[0] == idx for p in open_parts), "item done with an open content part"
            assert ev["item"]["id"] == item["id"]
            done_items.add(idx)
            del open_items[idx]
    assert not open_items, f"items never done: {list(open_items)}"
    final = terminals[0]["response"]
    assert final["id"] == rid, "response id changed during the stream"
    if terminals[0]["type"] != "response.failed":
        assert len(final["output"]) == next_index == len(done_items)
    validate_response(final)
    return final
