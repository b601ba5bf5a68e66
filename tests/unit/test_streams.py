"""Stream translators fed with recorded streams, whole and split at every point (sans-IO)."""

from __future__ import annotations

import itertools
import json

import pytest

from extproc.translate import resp_chat_to_responses, stream_chat_to_responses
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from extproc.translate.stream_responses_to_chat import ResponsesToChatStream
from tests.conformance import check_stream, sse_events

from . import recorded

_ids = itertools.count()


@pytest.fixture(autouse=True)
def fixed_ids(monkeypatch):
    """Item ids numbered per translator and a fixed clock, so two runs of the same stream compare equal."""
    monkeypatch.setattr(stream_chat_to_responses, "new_id", lambda prefix: f"{prefix}{next(_ids)}")
    monkeypatch.setattr(resp_chat_to_responses, "new_id", lambda prefix: f"{prefix}{next(_ids)}")
    monkeypatch.setattr(resp_chat_to_responses, "now", lambda: 1700000001)


events = sse_events

def run(translator, chunks: list[bytes]) -> bytes:
    return b"".join(translator.feed(c) for c in chunks) + translator.close()


def to_responses(chunks: list[bytes], request: dict | None = None) -> list[dict]:
    global _ids
    _ids = itertools.count()
    return events(run(ChatToResponsesStream(request or {"model": "qwen3", "stream": True}, "resp_1"), chunks))


# -- chat chunks -> Responses events ------------------------------------------------------------


def test_reasoning_text_and_parallel_calls():
    evs = to_responses([recorded.CHAT_REASONING_TEXT_TOOLS])
    final = check_stream(evs)
    assert final["status"] == "completed" and final["id"] == "resp_1"
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert final["output"][0]["summary"][0]["text"] == "Need weather."
    assert final["output"][1]["content"][0]["text"] == "Checking Zürich ☀️"
    calls = final["output"][2:]
    assert [(c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("call_a", "weather", {"city": "Zürich"}), ("call_b", "time", {"tz": "CET"})]
    assert final["usage"] == {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                              "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 29}
    kinds = [e["type"] for e in evs]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.reasoning_summary_part.added" in kinds and "response.reasoning_summary_text.done" in kinds
    done_args = [e["arguments"] for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(a) for a in done_args] == [{"city": "Zürich"}, {"tz": "CET"}]
    deltas = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert deltas == "Checking Zürich ☀️"


def test_every_split_point_gives_the_same_events():
    raw = recorded.CHAT_REASONING_TEXT_TOOLS
    whole = to_responses([raw])
    for i in range(len(raw) + 1):
        assert to_responses([raw[:i], raw[i:]]) == whole, i


def test_one_byte_chunks():
    raw = recorded.CHAT_REASONING_TEXT_TOOLS
    assert to_responses([raw[i:i + 1] for i in range(len(raw))]) == to_responses([raw])


def test_length_is_incomplete():
    final = check_stream(to_responses([recorded.CHAT_LENGTH]))
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"][0]["text"] == "cut off"


@pytest.mark.parametrize("raw", [recorded.CHAT_NO_FINISH, recorded.CHAT_ERROR], ids=["no-finish", "error-chunk"])
def test_failures_end_with_error_then_failed(raw):
    evs = to_responses([raw])
    assert [e["type"] for e in evs[-2:]] == ["error", "response.failed"]
    final = check_stream(evs)
    assert final["status"] == "failed" and final["error"]["message"]


def test_fail_before_any_chunk():
    t = ChatToResponsesStream({"model": "m"}, "resp_x")
    evs = events(t.fail("upstream_encoding", "corrupt"))
    assert [e["type"] for e in evs] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert t.close() == b""


def test_empty_turn_still_has_one_message():
    raw = b'data: {"id":"c","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    final = check_stream(to_responses([raw]))
    assert [i["type"] for i in final["output"]] == ["message"]


# -- Responses events -> chat chunks ------------------------------------------------------------


def to_chat(chunks: list[bytes], include_usage: bool = True) -> tuple[list[dict], bytes]:
    req = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = run(ResponsesToChatStream(req, "gpt-5.3-codex"), chunks)
    return events(raw), raw


def test_responses_to_chat_full():
    chunks, raw = to_chat([recorded.RESPONSES_FULL])
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"] == "chatcmpl-abc"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Think"
    assert "".join(d.get("content") or "" for d in deltas) == "Zürich"
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "arguments": ""})
            c["name"] += tc.get("function", {}).get("name", "")
            c["arguments"] += tc.get("function", {}).get("arguments", "")
    assert calls == {0: {"id": "call_1", "name": "weather", "arguments": "{\"city\":\"Zürich\"}"},
                     1: {"id": "call_2", "name": "time", "arguments": "{\"tz\":\"CET\"}"}}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 29
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}


def test_responses_to_chat_every_split_point():
    raw = recorded.RESPONSES_FULL
    whole = to_chat([raw])[1]
    for i in range(len(raw) + 1):
        assert to_chat([raw[:i], raw[i:]])[1] == whole, i


def test_no_usage_chunk_unless_asked():
    chunks, _ = to_chat([recorded.RESPONSES_FULL], include_usage=False)
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


def test_incomplete_is_length():
    chunks, _ = to_chat([recorded.RESPONSES_INCOMPLETE])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


@pytest.mark.parametrize("raw", [recorded.RESPONSES_FAILED, recorded.RESPONSES_FULL[:200]], ids=["failed", "cut"])
def test_failure_is_an_error_chunk_then_done(raw):
    chunks, out = to_chat([raw])
    assert "error" in chunks[-1] and chunks[-1]["error"]["message"]
    assert out.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("event", [
    {"type": "error", "code": "server_overloaded", "message": "overloaded, retry", "param": None, "sequence_number": 1},
    {"type": "error", "error": {"code": "server_overloaded", "message": "overloaded, retry"}, "sequence_number": 1},
], ids=["spec", "nested"])
def test_an_error_event_keeps_the_upstreams_code_and_message(event):
    raw = b'event: error\ndata: ' + json.dumps(event).encode() + b"\n\n"
    chunks, out = to_chat([raw])
    assert chunks[-1]["error"]["message"] == "overloaded, retry"
    assert chunks[-1]["error"]["code"] == "server_overloaded"
    assert out.endswith(b"data: [DONE]\n\n")
