"""The gateway's own key, found in whatever form an upstream writes it back, and removed (sans-IO).

An upstream that holds the key the sidecar injected can hand it back: quoted in an error, echoed in a
header or a redirect, inside an error event of a 200 stream, in a body that echoes the request's
headers. It may write it raw, JSON-escaped (`\\u0073k-...`, `\\/`), URL-encoded (`%73k-...`), or base64
(`Authorization: Basic ...` echoed, or a token that wraps it). `KeyForms` matches every one of these:
each character of the key may appear raw, as a JSON `\\u00XX` escape or as a `%XX` escape, in any mix,
and the base64 encodings at each of the three byte alignments, in both alphabets, are literals.

`StreamScrubber` does the same over a body that arrives in chunks, so a key split across two chunks
is still found: it holds back only a chunk's trailing run of bytes that could belong to a form of the
key (an SSE event or a JSON document ends in other bytes, so a stream is not delayed).
"""

from __future__ import annotations

import base64
import functools
import re

REDACTED = b"[redacted]"
_MIN_BASE64 = 16  # shorter base64 fragments would match unrelated text


def _hex(byte: int) -> bytes:
    """Two hex digits of a byte, either letter case."""
    return b"".join(b"[%c%c]" % (c, c ^ 0x20) if c >= 0x61 else bytes([c]) for c in b"%02x" % byte)


def _char(c: str) -> bytes:
    """The ways one character of the key can be written: raw, JSON-escaped, URL-encoded."""
    raw = c.encode()
    forms = [re.escape(raw)]
    if ord(c) < 0x80:
        forms += [rb"\\u00" + _hex(ord(c)), b"%" + _hex(ord(c))]
        if c == "/":
            forms.append(rb"\\/")
    elif ord(c) <= 0xFFFF:
        forms.append(rb"\\u" + b"".join(_hex(b) for b in ord(c).to_bytes(2, "big")))
    return b"(?:" + b"|".join(forms) + b")"


def _base64_forms(key: bytes) -> list[bytes]:
    """The base64 characters that depend on the key alone, at each of the three offsets in a longer
    encoded value, standard and URL-safe."""
    out: list[bytes] = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + key + b"\0\0").rstrip(b"=")
        first = -(-offset * 8 // 6)  # the first character made of key bits only
        last = (offset + len(key)) * 8 // 6  # one past the last
        middle = encoded[first:last]
        if len(middle) >= _MIN_BASE64:
            out += [middle, middle.translate(bytes.maketrans(b"+/", b"-_"))]
    return list(dict.fromkeys(out))


class KeyForms:
    """Every form of one key: where it occurs in some bytes, and those bytes without it."""

    def __init__(self, key: str):
        raw = key.encode()
        literals = _base64_forms(raw)
        escaped = b"".join(_char(c) for c in key)
        self.pattern = re.compile(b"|".join([escaped, *(re.escape(lit) for lit in literals)]))
        self.longest = max([6 * len(key), *(len(lit) for lit in literals)])  # every character \u00XX-escaped
        # Bytes that can occur inside some form: a run of anything else cannot hold part of the key.
        alphabet = set(raw) | set(b"\\/u%0123456789abcdefABCDEF") | {b for lit in literals for b in lit}
        self.alphabet = frozenset(alphabet)

    def scrub(self, data: bytes) -> bytes:
        return self.pattern.sub(REDACTED, data)

    def scrub_text(self, value: str) -> str:
        """A header value (Envoy's bytes as latin-1) without the key."""
        return self.scrub(value.encode("latin-1")).decode("latin-1")

    def found_in(self, value: str) -> bool:
        return self.pattern.search(value.encode("latin-1")) is not None

    def headers(self, headers: dict[str, str]) -> list[tuple[str, str]]:
        """The response headers that carry the key (`location`, `www-authenticate`, an echo), rewritten
        without it: set over the upstream's."""
        return [(k, self.scrub_text(v)) for k, v in headers.items() if not k.startswith(":") and self.found_in(v)]

    def held_back(self, data: bytes) -> int:
        """How many trailing bytes could be the start of a form that the next chunk completes."""
        n = 0
        limit = min(len(data), self.longest - 1)
        while n < limit and data[len(data) - 1 - n] in self.alphabet:
            n += 1
        return n


@functools.lru_cache(maxsize=64)
def forms_of(key: str) -> KeyForms:
    """Built once per key (a config reload keeps the same key, and so the same forms)."""
    return KeyForms(key)


class StreamScrubber:
    """A body in chunks, without the key even when one chunk ends inside it."""

    def __init__(self, forms: KeyForms):
        self.forms = forms
        self.tail = b""

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self.tail + chunk
        cut = len(data) if end else len(data) - self.forms.held_back(data)
        out: list[bytes] = []
        pos = 0
        for m in self.forms.pattern.finditer(data):
            if m.start() >= cut:
                break
            out += [data[pos:m.start()], REDACTED]
            pos = m.end()  # a match found whole may end past the cut
        emit = max(pos, cut)
        out.append(data[pos:emit])
        self.tail = data[emit:]
        return b"".join(out)
