"""Translated answers of an unusual kind (sans-IO): a streamed request answered with one JSON body
(the client still gets the complete stream it asked for), and statuses that are neither a success
nor an error (a 502 in the client's shape). Answers passed through are left alone."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import BUFFERED, STREAMED, Exchange
from extproc.routing.gateway import Gateway
from tests.conformance import check_stream, sse_events

from .test_flow import CFG, start

CHAT_ANSWER = {  # a chat-only backend's complete answer: reasoning, text, one tool call, usage
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "llama-3",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.",
        "tool_calls": [{"id": "call_w", "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Bern"}'}}]}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}
RESPONSE_ANSWER = {  # a Responses-only backend's complete answer: the same turn
    "id": "resp_abc", "object": "response", "created_at": 1700000000, "status": "completed", "model": "gpt-5.3-codex",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Need weather."}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_w", "name": "weather",
         "arguments": '{"city": "Bern"}', "status": "completed"},
    ],
    "usage": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18},
}
WEATHER_TOOL = {"type": "function", "name": "weather", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def gateway():
    return Gateway(parse_config(CFG, env={}))


def exchange(gateway, path: str, body: dict) -> Exchange:
    return start(gateway, path, body)[0]


def responses_stream(gateway, **extra) -> Exchange:
    return exchange(gateway, "/v1/responses", {"model": "llama-3", "input": "weather?", "stream": True,
                                               "tools": [WEATHER_TOOL], **extra})


def chat_stream(gateway, **extra) -> Exchange:
    return exchange(gateway, "/v1/chat/completions", {"model": "gpt-5.3-codex", "stream": True,
                                                      "messages": [{"role": "user", "content": "weather?"}], **extra})


def json_answer(ex: Exchange, doc: dict | bytes, status: str = "200"):
    head = ex.response_headers({":status": status, "content-type": "application/json", "content-length": "99"})
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return head, ex.response_body(raw, True)


def chat_chunks(body: bytes) -> list[dict]:
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"[DONE]") == 1, body[-200:]
    return sse_events(body)


# -- a stream asked for, one JSON body answered ---------------------------------------------------

def test_a_responses_client_gets_the_whole_event_stream_of_a_json_chat_answer(gateway):
    ex = responses_stream(gateway)
    head, act = json_answer(ex, CHAT_ANSWER)
    assert head.response_body_mode == BUFFERED and "content-length" in head.remove_headers
    assert dict(head.set_headers)["content-type"].startswith("text/event-stream")
    assert act.done and dict(act.set_headers)["content-length"] == str(len(act.body))
    events = sse_events(act.body)
    final = check_stream(events)  # Open Responses schema, sequence numbers, item and part lifecycles
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(19))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Checking."
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "Need weather."}]
    call = final["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_w", "weather", '{"city": "Bern"}')
    assert (final["status"], final["model"], final["created_at"]) == ("completed", "llama-3", 1700000000)
    assert final["usage"]["input_tokens"] == 11 and final["usage"]["output_tokens"] == 7
    assert (ex.usage.input_tokens, ex.usage.output_tokens, ex.usage.estimated) == (11, 7, False)
    # the turn is kept under the id the client saw, so previous_response_id continues from it
    [(key, record), (owner, _)] = act.writes
    assert key.startswith("turn:") and key.endswith(":" + final["id"]) and b"Checking." in record
    assert owner == "owner:" + final["id"]


def test_a_chat_client_gets_the_whole_chunk_stream_of_a_json_responses_answer(gateway):
    ex = chat_stream(gateway, stream_options={"include_usage": True})
    head, act = json_answer(ex, RESPONSE_ANSWER)
    assert head.response_body_mode == BUFFERED
    assert dict(head.set_headers)["content-type"].startswith("text/event-stream")
    base = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-5.3-codex", "system_fingerprint": None}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    assert chat_chunks(act.body) == [
        chunk({"role": "assistant"}),
        chunk({"reasoning_content": "Need weather."}),
        chunk({"content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_w", "type": "function",
                               "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Bern"}'}}]}),
        chunk({}, "tool_calls"),
        {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                                          "prompt_tokens_details": {"cached_tokens": 0},
                                          "completion_tokens_details": {"reasoning_tokens": 0}}},
    ]
    assert (ex.usage.input_tokens, ex.usage.output_tokens) == (11, 7)


def test_a_chat_client_that_did_not_ask_for_usage_gets_no_usage_chunk(gateway):
    answer = {**RESPONSE_ANSWER, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
              "output": [RESPONSE_ANSWER["output"][1]]}
    _, act = json_answer(chat_stream(gateway), answer)
    chunks = chat_chunks(act.body)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant"}, {"content": "Checking."}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in chunks)


def test_a_json_answer_of_a_failed_response_ends_the_chat_stream_with_its_error(gateway):
    answer = {**RESPONSE_ANSWER, "status": "failed", "output": [],
              "error": {"code": "server_error", "message": "model crashed"}}
    _, act = json_answer(chat_stream(gateway), answer)
    chunks = chat_chunks(act.body)
    assert chunks[-1] == {"error": {"message": "model crashed", "type": "server_error", "param": None,
                                    "code": "server_error"}}
    assert act.body.endswith(b"data: [DONE]\n\n")


def test_a_json_chat_answer_without_finish_reason_is_a_completed_stream(gateway):
    answer = {**CHAT_ANSWER, "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}}]}
    _, act = json_answer(responses_stream(gateway), answer)
    final = check_stream(sse_events(act.body))
    assert final["status"] == "completed"
    assert [part["text"] for part in final["output"][0]["content"]] == ["Hi."]


def test_a_2xx_other_than_200_is_replayed_too(gateway):
    ex = chat_stream(gateway)
    _, act = json_answer(ex, RESPONSE_ANSWER, status="201")
    assert [c["choices"][0].get("finish_reason") for c in chat_chunks(act.body)][-1] == "tool_calls"


@pytest.mark.parametrize(("raw", "why"), [
    (b"<html>busy</html>", "the body is not JSON"),
    (b"[1, 2]", "the body is not a JSON object"),
    (json.dumps({**CHAT_ANSWER, "choices": 5}).encode(), "'choices'"),
])
def test_a_broken_json_answer_ends_the_responses_stream_like_a_broken_stream(gateway, raw, why):
    head, act = json_answer(responses_stream(gateway), raw)
    assert dict(head.set_headers)["content-type"].startswith("text/event-stream")
    events = sse_events(act.body)
    final = check_stream(events)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2]["error"]["code"] == "bad_upstream_response" and why in events[2]["error"]["message"]
    assert final["status"] == "failed" and final["error"]["code"] == "bad_upstream_response"
    assert act.done and not act.writes


@pytest.mark.parametrize(("raw", "why"), [
    (b"<html>busy</html>", "the body is not JSON"),
    (json.dumps({**RESPONSE_ANSWER, "output": 5}).encode(), "'output'"),
])
def test_a_broken_json_answer_ends_the_chat_stream_with_an_error_chunk_and_done(gateway, raw, why):
    _, act = json_answer(chat_stream(gateway), raw)
    chunks = chat_chunks(act.body)
    assert len(chunks) == 1 and chunks[0]["error"]["code"] == "bad_upstream_response"
    assert why in chunks[0]["error"]["message"]


def test_a_streamed_request_with_an_error_status_still_gets_a_json_error(gateway):
    head, act = json_answer(responses_stream(gateway), {"error": {"message": "slow down"}}, status="429")
    assert dict(head.set_headers)["content-type"] == "application/json"
    assert json.loads(act.body)["error"]["message"] == "slow down"


def test_a_request_that_did_not_ask_for_a_stream_still_gets_json(gateway):
    ex = exchange(gateway, "/v1/responses", {"model": "llama-3", "input": "weather?"})
    head, act = json_answer(ex, CHAT_ANSWER)
    assert dict(head.set_headers)["content-type"] == "application/json"
    assert json.loads(act.body)["output"][1]["content"][0]["text"] == "Checking."


def test_a_json_answer_to_a_stream_passed_through_is_left_alone(gateway):
    ex = exchange(gateway, "/v1/chat/completions", {"model": "llama-3", "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    head = ex.response_headers({":status": "200", "content-type": "application/json"})
    assert head.response_body_mode == STREAMED and not head.set_headers and not head.remove_headers
    act = ex.response_body(json.dumps(CHAT_ANSWER).encode(), True)
    assert act.body is None and not act.set_headers


# -- statuses that are neither a success nor an error -------------------------------------------------

ODD = ["100", "150", "302", "304", "399", "600", "999"]


@pytest.mark.parametrize("status", ODD)
@pytest.mark.parametrize("body_follows", [True, False])
@pytest.mark.parametrize("start", [responses_stream, chat_stream])
def test_an_odd_status_on_a_translated_exchange_is_a_502(gateway, start, status, body_follows):
    ex = start(gateway)
    with pytest.raises(GatewayError) as e:
        ex.response_headers({":status": status, "content-type": "application/json"}, end_of_stream=not body_follows)
    assert (e.value.status, e.value.code, e.value.type) == (502, "bad_upstream_response", "server_error")
    assert e.value.message == f"the upstream returned a response the gateway cannot use: status {status}"
    assert json.loads(e.value.body()) == {"error": {
        "message": e.value.message, "type": "server_error", "param": None, "code": "bad_upstream_response"}}


@pytest.mark.parametrize("status", ["304", "302", "999"])
def test_an_odd_status_passed_through_is_left_alone(gateway, status):
    ex = exchange(gateway, "/v1/chat/completions", {"model": "llama-3",
                                                    "messages": [{"role": "user", "content": "hi"}]})
    act = ex.response_headers({":status": status, "content-type": "application/json"})
    assert act.body is None and act.immediate is None and not act.set_headers and not act.remove_headers


def test_a_201_json_answer_is_translated_and_a_201_stream_streamed(gateway):
    ex = exchange(gateway, "/v1/responses", {"model": "llama-3", "input": "weather?"})
    _, act = json_answer(ex, CHAT_ANSWER, status="201")
    assert json.loads(act.body)["output"][1]["content"][0]["text"] == "Checking."
    ex = responses_stream(gateway)
    head = ex.response_headers({":status": "201", "content-type": "text/event-stream"})
    assert head.response_body_mode == STREAMED


@pytest.mark.parametrize(("status", "code", "message"), [
    ("failed", "server_error", "model crashed"), ("cancelled", "upstream_error", "the upstream's response cancelled"),
    ("queued", "bad_upstream_response", "'status' is 'queued': the response is not finished"),
    ("in_progress", "bad_upstream_response", "'status' is 'in_progress': the response is not finished"),
])
def test_a_json_response_that_is_not_a_finished_answer_is_a_502_for_a_chat_client(status, code, message):
    """A failed or cancelled Response is the upstream's error; a queued or running one is no completion
    (the sidecar never asks a chat client's request to run in the background)."""
    from extproc.translate.resp_responses_to_chat import translate_response

    answer = {**RESPONSE_ANSWER, "status": status,
              **({"error": {"code": "server_error", "message": "model crashed"}} if status == "failed" else {})}
    with pytest.raises(GatewayError) as e:
        translate_response(answer, "m")
    assert (e.value.status, e.value.code) == (502, code) and message in e.value.message
