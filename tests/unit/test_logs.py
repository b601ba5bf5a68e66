"""The sidecar's log lines: a client's text (model name, path) can never forge a line or a field."""

from __future__ import annotations

import json
import logging
import sys

from extproc.ops.logs import JsonFormatter, TextFormatter

FAKE = 'x\n2026-01-01 00:00:00,000 INFO extproc request model=gpt outcome=ok\r\x1b[2J\u2028{"level":"info"}\x85'


def record(msg: str = "request", exc: bool = False, **fields: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad model {FAKE}")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("extproc", logging.INFO, __file__, 1, msg, None, exc_info)
    rec.fields = fields
    return rec


def test_json_line_keeps_every_value_and_stays_one_line():
    out = JsonFormatter().format(record(FAKE, model=FAKE, path="/v1/responses", status=200))
    assert len(out.splitlines()) == 1  # splitlines also splits on U+2028, U+0085, U+001C..U+001E
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F and c != "\u2028" for c in out)
    doc = json.loads(out)
    assert (doc["msg"], doc["model"], doc["path"], doc["status"]) == (FAKE, FAKE, "/v1/responses", 200)


def test_json_exception_is_a_field_of_the_same_line():
    out = JsonFormatter().format(record(exc=True))
    assert len(out.splitlines()) == 1
    assert json.loads(out)["exception"].endswith(f"ValueError: bad model {FAKE}")


def test_text_line_escapes_the_message_and_quotes_unsafe_values():
    out = TextFormatter().format(record(FAKE, model=FAKE, backend="vllm", note="a outcome=ok", empty="", n=3))
    assert len(out.splitlines()) == 1
    assert ' INFO extproc x\\n2026-01-01 00:00:00,000 INFO extproc request model=gpt outcome=ok\\r\\u001b[2J' in out
    assert out.endswith(' backend=vllm note="a outcome=ok" empty="" n=3')
    quoted = '"' + out.split(' model="', 1)[1].split(" backend=", 1)[0]
    assert json.loads(quoted) == FAKE  # unambiguous: the exact value reads back


def test_text_traceback_lines_cannot_pass_for_records():
    out = TextFormatter().format(record("failed", exc=True)).split("\n")
    assert out[0].endswith(" INFO extproc failed")
    assert len(out) > 2 and all(line.startswith("  | ") for line in out[1:])
    assert out[-2:] == ["  | ValueError: bad model x",
                        '  | 2026-01-01 00:00:00,000 INFO extproc request model=gpt outcome=ok\\r\\u001b[2J\\u2028'
                        '{"level":"info"}\\u0085']
