"""Log output: one JSON object per line (default) or plain text; per-request fields come in `extra`.

Models, paths and request ids come from clients, so neither format lets a value start a line of its
own or rewrite what a terminal shows: control characters are escaped in both (see docs/security.md).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

# What ends a line or rewrites a display: C0 and C1 controls, DEL, the Unicode line and paragraph
# separators (Python's splitlines and some log shippers split on them) and bidirectional overrides.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BARE = re.compile(r'[^\s="\\]+')  # a text field value written without quotes


def escape(text: str) -> str:
    """`text` with every unsafe character as a JSON-style escape (valid inside a JSON string too)."""
    return _UNSAFE.sub(lambda m: _NAMED.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


def _text_value(value: Any) -> str:
    """A field value for `key=value`: bare when that is unambiguous, else a JSON string, so a value
    holding ` outcome=ok` cannot pass for another field."""
    text = value if isinstance(value, str) else str(value)
    return text if _BARE.fullmatch(text) and not _UNSAFE.search(text) else escape(orjson.dumps(text).decode())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return escape(orjson.dumps(doc, default=str).decode())  # orjson escapes C0 only


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...` on one line; a traceback follows on lines that start
    with `  | `, which no record line does."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record)} {record.levelname} {record.name} {escape(record.getMessage())}"
        fields = getattr(record, "fields", None) or {}
        text += "".join(f" {k}={_text_value(v)}" for k, v in fields.items() if v is not None)
        tail = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            tail += "\n" + self.formatStack(record.stack_info)
        return text + "".join("\n  | " + escape(line) for line in tail.split("\n") if line)


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
