"""Incremental Server-Sent Events codec.

Feed it network chunks as they come: events may be split anywhere (inside a line, inside a
multi-byte UTF-8 character, between `\\r` and `\\n`) and one chunk may carry many events. Only the
unfinished tail is kept between chunks, so the cost of a chunk is proportional to its size.
"""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    """One event: a tuple, built for every event of every stream at two thirds of a frozen dataclass's cost."""

    data: str
    event: str | None = None


class SSEDecoder:
    __slots__ = ("_data", "_event", "_skip_lf", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._skip_lf = False  # the last chunk ended in "\r": a leading "\n" now belongs to it

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        buf = self._tail + chunk if self._tail else chunk
        events: list[Event] = []
        if b"\r" not in buf:
            # The common case, every line ended by "\n": split once, and take a `data: ` line without
            # the general line parser (this runs for every streamed chunk).
            lines = buf.split(b"\n")
            self._tail = lines.pop()  # b"" when the chunk ended a line
            data = self._data
            for line in lines:
                if line[:6] == b"data: ":
                    data.append(line[6:])
                else:
                    self._line(line, events)
                    data = self._data
            return events
        lines = buf.splitlines(keepends=True)
        last = lines[-1]
        if last.endswith(b"\n") or last.endswith(b"\r"):
            self._tail = b""
            self._skip_lf = last.endswith(b"\r")
        else:
            self._tail = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r\n"), events)
        return events

    def close(self) -> list[Event]:
        """End of stream: a final event without its blank line is still delivered."""
        events: list[Event] = []
        if self._tail:
            self._line(self._tail, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append(Event(b"\n".join(self._data).decode("utf-8", "replace"),
                                    self._event.decode("utf-8", "replace") if self._event else None))
            self._data = []
            self._event = None
            return
        if line[:1] == b":":
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value


def encode(data: bytes, event: str | None = None) -> bytes:
    """One SSE event; `data` is a single line (compact JSON)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


DONE = encode(b"[DONE]")  # the end of a chat completion stream
