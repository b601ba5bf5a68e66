"""What the shell reads of an upstream filter's stream (a first contact's attempt, a model group's
attempt) besides its messages, as it reads an `Exchange`: the request line, for its logs, and no
metadata of its own (the client-side exchange, or the attempt's own exchange, reports the request)."""

from __future__ import annotations

from typing import Protocol


class _Headed(Protocol):
    @property
    def headers(self) -> dict[str, str]: ...


class UpstreamStream:
    """The request line from the stream's `headers` (an attribute or a property of the class)."""

    def metadata(self) -> None:
        return None

    @property
    def method(self: _Headed) -> str:
        return self.headers.get(":method", "")

    @property
    def path(self: _Headed) -> str:
        return self.headers.get(":path", "")
