"""The event log of a streamed background response on a chat-only backend (sans-IO).

A background run created with `stream: true` keeps its translated Responses event stream in the
store, one record per event (`bgev:<tenant>:<id>:<sequence_number>`, the SSE bytes as the client
gets them), and, with the terminal event, the log's last sequence number (`bgev:<tenant>:<id>:end`).
The client's stream, live or resumed with `starting_after`, is that log read back in order by
whichever replica serves it (`Cursor`), so every reader sees the same events with the same
sequence numbers, and a resume gets exactly the events after its cursor.

`EventLog` is the writer: it numbers the run's events after the queued `response.created` the
create call logged (the run's own `response.created` is that one), gives every Response snapshot
the queued id, and keeps which output items are still open (`OpenItems`), so that a run it must
end early (cancelled, or over `limits.background_max_events` / `background_max_event_bytes`) still
ends in the stream's grammar: open parts and items done (`incomplete`), then one terminal event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.translate.sse import encode

Writes = list[tuple[str, bytes | None]]
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
LIMIT_CODE = "background_events_limit"


def event_key(tenant: str, response_id: str, seq: int | str) -> str:
    return f"bgev:{tenant}:{response_id}:{seq}"


def end_key(tenant: str, response_id: str) -> str:
    return event_key(tenant, response_id, "end")


class OpenItems:
    """The output items of a Responses stream so far, from its events: those still open with what
    they hold, to close them with the events the stream would have sent (the translator's shapes)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []  # by output_index: the item as it stands
        self.open: set[int] = set()
        self.parts: dict[tuple[int, int], dict[str, Any]] = {}  # open content / summary parts

    def see(self, ev: dict[str, Any]) -> None:
        kind, idx = ev.get("type"), ev.get("output_index")
        if kind == "response.output_item.added" and isinstance(ev.get("item"), dict):
            self.items.append(dict(ev["item"]))
            self.open.add(len(self.items) - 1)
        elif not isinstance(idx, int) or idx not in self.open:
            return
        elif kind == "response.output_item.done" and isinstance(ev.get("item"), dict):
            self.items[idx] = ev["item"]
            self.open.discard(idx)
        elif kind == "response.content_part.added":
            self.parts[(idx, ev["content_index"])] = dict(ev["part"])
        elif kind == "response.content_part.done":
            self.parts.pop((idx, ev["content_index"]), None)
            self.items[idx].setdefault("content", []).append(ev["part"])
        elif kind == "response.reasoning_summary_part.added":
            self.parts[(idx, ev["summary_index"])] = dict(ev["part"])
        elif kind == "response.reasoning_summary_part.done":
            self.parts.pop((idx, ev["summary_index"]), None)
            self.items[idx].setdefault("summary", []).append(ev["part"])
        elif kind in ("response.output_text.delta", "response.reasoning_summary_text.delta"):
            part = self.parts.get((idx, int(ev.get("content_index", ev.get("summary_index", 0)))))
            if part is not None:
                part["text"] = part.get("text", "") + ev["delta"]
        elif kind == "response.refusal.delta":
            part = self.parts.get((idx, ev["content_index"]))
            if part is not None:
                part["refusal"] = part.get("refusal", "") + ev["delta"]
        elif kind == "response.function_call_arguments.delta":
            self.items[idx]["arguments"] = self.items[idx].get("arguments", "") + ev["delta"]
        elif kind == "response.custom_tool_call_input.delta":
            self.items[idx]["input"] = self.items[idx].get("input", "") + ev["delta"]

    def closing(self) -> list[dict[str, Any]]:
        """The events (without sequence numbers) that close every open part and item, in output order."""
        out: list[dict[str, Any]] = []
        for idx in sorted(self.open):
            item = self.items[idx]
            base = {"item_id": item.get("id"), "output_index": idx}
            for (i, n), part in sorted(self.parts.items()):
                if i != idx:
                    continue
                if item.get("type") == "reasoning":
                    at = {**base, "summary_index": n}
                    out += [{"type": "response.reasoning_summary_text.done", **at, "text": part.get("text", "")},
                            {"type": "response.reasoning_summary_part.done", **at, "part": part}]
                    item.setdefault("summary", []).append(part)
                    continue
                at = {**base, "content_index": n}
                if part.get("type") == "refusal":
                    out.append({"type": "response.refusal.done", **at, "refusal": part.get("refusal", "")})
                else:
                    out.append({"type": "response.output_text.done", **at, "text": part.get("text", ""),
                                "logprobs": []})
                out.append({"type": "response.content_part.done", **at, "part": part})
                item.setdefault("content", []).append(part)
            if item.get("type") == "function_call":
                out.append({"type": "response.function_call_arguments.done", **base, "name": item.get("name"),
                            "arguments": item.get("arguments", "")})
            elif item.get("type") == "custom_tool_call":
                out.append({"type": "response.custom_tool_call_input.done", **base, "input": item.get("input", "")})
            if "status" in item:
                item["status"] = "incomplete"
            out.append({"type": "response.output_item.done", "output_index": idx, "item": item})
        self.parts.clear()
        self.open.clear()
        return out


@dataclass
class EventLog:
    """The writer of one run's log. With `kept` false (a run not created with `stream: true`) it
    records nothing, but still follows the stream to the run's final Response."""

    tenant: str
    response: dict[str, Any]  # the queued Response: its id, created_at and flags go on every snapshot
    kept: bool
    max_events: int
    max_bytes: int
    seq: int = 0  # the next sequence number
    size: int = 0
    final: dict[str, Any] | None = None  # the terminal event's Response, once logged
    items: OpenItems = field(default_factory=OpenItems)
    latest: dict[str, Any] = field(default_factory=dict)  # the last Response snapshot logged

    @property
    def ended(self) -> bool:
        return self.final is not None

    def terminal(self) -> dict[str, Any]:
        """The Response of the log's terminal event (the log has ended)."""
        assert self.final is not None
        return self.final

    def first(self) -> Writes:
        """`response.created` with the queued Response: sequence number 0, logged by the create call."""
        return self._log([{"type": "response.created", "response": self.response}])

    def record(self, data: str) -> Writes:
        """One event of the run's stream (its SSE data), as the log keeps it; over the limit, the
        log's end instead."""
        if self.ended or data == "[DONE]":
            return []
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(ev, dict) or ev.get("type") == "response.created":
            return []  # the queued one is logged already
        if self.kept and (self.seq + 1 > self.max_events or self.size + len(data) > self.max_bytes):
            return self.fail(LIMIT_CODE, f"the response's stream passed the gateway's event log limit "
                                         f"({self.max_events} events or {self.max_bytes} bytes: "
                                         "limits.background_max_events / background_max_event_bytes)")
        return self._log([ev])

    def fail(self, code: str, message: str) -> Writes:
        """End the log now: open items closed, an error event, then `response.failed` with the error."""
        failed = {**self._snapshot(), "status": "failed", "error": {"code": code, "message": message}}
        error = {"type": "error", "error": {"type": "server_error", "code": code, "message": message, "param": None}}
        return self._close([error, {"type": "response.failed", "response": failed}])

    def cancel(self) -> Writes:
        """End the log of a cancelled run: open items closed, then the cancelled Response. The stream
        has no event of its own for a cancellation, so the terminal is `response.failed`."""
        return self._close([{"type": "response.failed", "response": {**self._snapshot(), "status": "cancelled"}}])

    def _snapshot(self) -> dict[str, Any]:
        """The Response as the stream last showed it (the model the upstream named...), to end it with."""
        return {**(self.latest or self.response), "output": [], "error": None}

    def _close(self, terminal: list[dict[str, Any]]) -> Writes:
        if self.ended:
            return []
        closing = self.items.closing()
        terminal[-1]["response"]["output"] = self.items.items
        if self.seq == 1:  # ended before the run's stream began: the stream's second event all the same
            closing.insert(0, {"type": "response.in_progress", "response": {**self._snapshot(), "status": "in_progress"}})
        return self._log([*closing, *terminal])

    def _log(self, events: list[dict[str, Any]]) -> Writes:
        writes: Writes = []
        for ev in events:
            if isinstance(ev.get("response"), dict):
                ev["response"] = self.latest = {**ev["response"], "id": self.response["id"],
                                                "created_at": self.response["created_at"], "background": True,
                                                "store": True}
            ev["sequence_number"] = self.seq
            self.items.see(ev)
            raw = encode(orjson.dumps(ev), str(ev["type"]))
            if self.kept:
                writes.append((event_key(self.tenant, self.response["id"], self.seq), raw))
            self.size += len(raw)
            if ev["type"] in TERMINAL:
                self.final = ev["response"]
                if self.kept:
                    writes.append((end_key(self.tenant, self.response["id"]), str(self.seq).encode()))
            self.seq += 1
        return writes


@dataclass
class Cursor:
    """A reader of the log: the events after `after` (a `starting_after`; -1 for all), in order."""

    tenant: str
    response_id: str
    after: int = -1
    end: int | None = None  # the terminal event's sequence number, once known
    batch: int = 64

    @property
    def done(self) -> bool:
        return self.end is not None and self.after >= self.end

    def reads(self) -> tuple[str, ...]:
        """The end mark, then the next `batch` events."""
        return (end_key(self.tenant, self.response_id),
                *(event_key(self.tenant, self.response_id, n) for n in range(self.after + 1, self.after + 1 + self.batch)))

    def take(self, values: list[bytes | None]) -> list[bytes]:
        """The events read that follow the cursor without a gap (a later one may be written first)."""
        if values[0] is not None:
            self.end = int(values[0])
        out: list[bytes] = []
        for raw in values[1:]:
            if raw is None or (self.end is not None and self.after >= self.end):
                break
            out.append(raw)
            self.after += 1
        return out


@dataclass
class Backoff:
    """How long a reader waits before it looks again: not at all after finding events, then from
    `first` doubling to `most` while the log stays as it was."""

    first: float = 0.01
    most: float = 0.2
    current: float = 0.0

    def next(self, found: bool) -> float:
        self.current = 0.0 if found else min(self.most, self.current * 2 or self.first)
        return self.current
