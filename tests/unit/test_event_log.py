"""The event log of a streamed background response, sans-IO: what the writer keeps (numbered, under
the queued id), how it ends a run early in the stream's grammar (cancelled, over its limits), and
how a reader's cursor reads it back (in order, no gaps, to the end)."""

from __future__ import annotations

import itertools
import json

import pytest

from extproc.state.event_log import Backoff, Cursor, EventLog, end_key, event_key
from extproc.translate import resp_chat_to_responses, stream_chat_to_responses
from extproc.translate.sse import SSEDecoder
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from tests.conformance import check_stream, sse_events

from . import recorded

QUEUED = {"id": "resp_q", "object": "response", "created_at": 1700000000, "status": "queued", "background": True,
          "completed_at": None, "incomplete_details": None, "model": "qwen3", "previous_response_id": None,
          "instructions": None, "output": [], "error": None, "tools": [], "tool_choice": "auto",
          "truncation": "disabled", "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "top_p": 1.0,
          "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0, "temperature": 1.0,
          "reasoning": None, "usage": None, "max_output_tokens": None, "max_tool_calls": None, "store": True,
          "service_tier": "default", "metadata": {}, "safety_identifier": None, "prompt_cache_key": None}


@pytest.fixture(autouse=True)
def fixed_ids(monkeypatch):
    ids = itertools.count()
    monkeypatch.setattr(stream_chat_to_responses, "new_id", lambda prefix: f"{prefix}{next(ids)}")
    monkeypatch.setattr(resp_chat_to_responses, "new_id", lambda prefix: f"{prefix}{next(ids)}")


def run_events(chat: bytes = recorded.CHAT_REASONING_TEXT_TOOLS) -> list[str]:
    """The SSE data of the stream the processor sends a run: a chat backend's answer, translated."""
    translator = ChatToResponsesStream({"model": "qwen3", "stream": True}, "resp_inner")
    decoder = SSEDecoder()
    return [e.data for e in decoder.feed(translator.feed(chat) + translator.close()) + decoder.close()]


def new_log(kept: bool = True, max_events: int = 1000, max_bytes: int = 1 << 20) -> tuple[EventLog, dict]:
    log = EventLog("t1", dict(QUEUED), kept, max_events, max_bytes)
    return log, dict(log.first())


def logged(store: dict) -> list[dict]:
    """The log's events in sequence order, as a reader gets them."""
    return sse_events(b"".join(store[event_key("t1", "resp_q", n)] for n in range(int(store[end_key("t1", "resp_q")]) + 1)))


def test_a_whole_run_is_logged_as_one_stream_under_the_queued_id():
    log, store = new_log()
    upstream = run_events()
    for data in upstream:
        store.update(log.record(data))
    events = logged(store)
    final = check_stream(events)
    assert events[0]["response"]["status"] == "queued"
    assert len(events) == len(upstream)  # the run's own response.created is the queued one
    assert [json.loads(d)["type"] for d in upstream[1:]] == [e["type"] for e in events[1:]]
    assert {e["response"]["id"] for e in events if "response" in e} == {"resp_q"}
    assert final["status"] == "completed" and final["background"] is True and final["store"] is True
    assert final["created_at"] == QUEUED["created_at"] and log.terminal() == final
    assert log.record(upstream[-1]) == []  # nothing after the end


@pytest.mark.parametrize("cut", range(1, len(run_events()) - 1))
def test_a_run_cancelled_anywhere_ends_in_the_streams_grammar(cut):
    log, store = new_log()
    upstream = run_events()
    for data in upstream[:cut]:
        store.update(log.record(data))
    store.update(log.cancel())
    events = logged(store)
    final = check_stream(events)  # open parts and items done, then one terminal
    assert (events[-1]["type"], final["status"], final["error"]) == ("response.failed", "cancelled", None)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert final["output"] == done
    sent = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    texts = [p["text"] for i in done if i["type"] == "message" for p in i["content"]]
    assert texts == ([sent] if any(e["type"] == "response.content_part.added" for e in events) else [])
    assert log.cancel() == []


def test_over_the_event_limit_the_log_fails_at_it():
    log, store = new_log(max_events=6)
    upstream = run_events()
    for data in upstream:
        store.update(log.record(data))
    events = logged(store)
    final = check_stream(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    # six events are the run's (the queued one first); the closing ones and the terminal pass the limit
    assert [e["type"] for e in events[:6]] == ["response.created"] + [json.loads(d)["type"] for d in upstream[1:6]]
    assert not any(e["type"].endswith(".delta") or e["type"].endswith(".added") for e in events[6:])
    assert final["status"] == "failed" and final["error"]["code"] == "background_events_limit"
    assert "limits.background_max_events" in final["error"]["message"]


def test_over_the_byte_limit_the_log_fails_at_it():
    log, store = new_log(max_bytes=1500)
    for data in run_events():
        store.update(log.record(data))
    events = logged(store)
    final = check_stream(events)
    assert final["error"]["code"] == "background_events_limit"
    kept = [e for e in events if e["type"] not in ("error", "response.failed")]
    assert 0 < len(kept) < len(run_events())


def test_a_log_not_kept_writes_nothing_but_knows_the_final_response():
    log, first = new_log(kept=False)
    assert first == {}
    assert all(log.record(data) == [] for data in run_events())
    assert log.terminal()["status"] == "completed" and log.terminal()["id"] == "resp_q"
    assert log.fail("x", "y") == [] and log.terminal()["status"] == "completed"


def test_a_cursor_reads_in_order_without_gaps_to_the_end():
    log, store = new_log()
    upstream = run_events()
    for data in upstream[:4]:
        store.update(log.record(data))
    cursor = Cursor("t1", "resp_q", after=1, batch=2)
    assert cursor.reads() == (end_key("t1", "resp_q"), event_key("t1", "resp_q", 2), event_key("t1", "resp_q", 3))
    got = cursor.take([store.get(k) for k in cursor.reads()])
    assert [json.loads(g.split(b"data: ", 1)[1])["sequence_number"] for g in got] == [2, 3] and cursor.after == 3
    assert cursor.take([store.get(k) for k in cursor.reads()]) == [] and not cursor.done  # nothing new yet
    rest = log.record(upstream[4]) + log.record(upstream[5])
    store.update(rest[1:])  # a later event written first: not read before the one it follows
    assert cursor.take([store.get(k) for k in cursor.reads()]) == []
    store.update(rest[:1])
    assert len(cursor.take([store.get(k) for k in cursor.reads()])) == 2
    for data in upstream[6:]:
        store.update(log.record(data))
    while not cursor.done:
        cursor.take([store.get(k) for k in cursor.reads()])
    assert cursor.after == int(store[end_key("t1", "resp_q")]) == len(upstream) - 1


def test_a_cursor_at_or_past_the_end_of_a_finished_log_reads_nothing():
    log, store = new_log()
    for data in run_events():
        store.update(log.record(data))
    last = int(store[end_key("t1", "resp_q")])
    for after in (last, last + 5):
        cursor = Cursor("t1", "resp_q", after=after)
        assert cursor.take([store.get(k) for k in cursor.reads()]) == [] and cursor.done


def test_a_reader_backs_off_while_the_log_is_still_and_not_after_it_grew():
    b = Backoff(first=0.01, most=0.05)
    assert [b.next(False) for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert b.next(True) == 0.0 and b.next(False) == 0.01
