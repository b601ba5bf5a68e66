"""What both stream translators share: SSE decoded as it arrives, output collected, one ending."""

from __future__ import annotations

from extproc.translate.sse import SSEDecoder


class SSETranslator:
    """Subclasses handle one upstream event (`_event`), end a stream that stopped early
    (`_end_early`) and end one with an error (`_fail`)."""

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.ended = False
        self.out: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        for ev in self.decoder.feed(data):
            self._event(ev.data)
        return self._take()

    def close(self) -> bytes:
        for ev in self.decoder.close():
            self._event(ev.data)
        if not self.ended:
            self._end_early()
        return self._take()

    def fail(self, code: str, message: str) -> bytes:
        """End the stream now with an error; returns the bytes for the client."""
        self._fail(code, message)
        return self._take()

    def _take(self) -> bytes:
        out, self.out = b"".join(self.out), []
        return out

    def _event(self, data: str) -> None:
        raise NotImplementedError

    def _end_early(self) -> None:
        raise NotImplementedError

    def _fail(self, code: str, message: str) -> None:
        raise NotImplementedError
