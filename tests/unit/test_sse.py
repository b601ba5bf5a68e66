"""The SSE decoder gives the same events however the bytes are split."""

from __future__ import annotations

import pytest

from extproc.translate.sse import Event, SSEDecoder, encode

from .recorded import CHAT_REASONING_TEXT_TOOLS, RESPONSES_FULL


def decode_all(chunks: list[bytes]) -> list[Event]:
    d = SSEDecoder()
    out = [e for c in chunks for e in d.feed(c)]
    return out + d.close()


def test_field_forms():
    raw = b": comment\nevent: a\ndata: x\n\ndata:y\r\ndata:  z\r\n\r\nid: 1\nretry: 5\ndata: w\rdata: v\r\r"
    assert decode_all([raw]) == [Event("x", "a"), Event("y\n z"), Event("w\nv")]


def test_final_event_without_blank_line():
    assert decode_all([b"data: last"]) == [Event("last")]


def test_several_events_in_one_chunk():
    assert [e.data for e in decode_all([b"data: 1\n\ndata: 2\n\ndata: 3\n\n"])] == ["1", "2", "3"]


@pytest.mark.parametrize("raw", [CHAT_REASONING_TEXT_TOOLS, RESPONSES_FULL], ids=["chat", "responses"])
def test_every_split_point(raw):
    whole = decode_all([raw])
    assert len(whole) > 5
    for i in range(len(raw) + 1):  # inside lines, inside UTF-8 characters, between \r and \n
        assert decode_all([raw[:i], raw[i:]]) == whole, i


@pytest.mark.parametrize("raw", [CHAT_REASONING_TEXT_TOOLS, RESPONSES_FULL], ids=["chat", "responses"])
def test_byte_by_byte(raw):
    assert decode_all([raw[i:i + 1] for i in range(len(raw))]) == decode_all([raw])


def test_tail_is_only_the_unfinished_line():
    d = SSEDecoder()
    for _ in range(1000):
        d.feed(b"data: " + b"x" * 100 + b"\n\n")
    d.feed(b"data: part")
    assert d._tail == b"data: part"


def test_encode_round_trip():
    raw = encode(b'{"a":1}', "response.created") + encode(b"[DONE]")
    assert decode_all([raw]) == [Event('{"a":1}', "response.created"), Event("[DONE]")]
