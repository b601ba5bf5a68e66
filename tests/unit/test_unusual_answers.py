"""Translated answers of an unusual kind (sans-IO): a streamed request answered with one JSON body
(the client still gets the complete stream it asked for), and statuses that are neither a success
nor an error (a 502 in the client's shape). Answers passed through are left alone."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange
from extproc.routing.gateway import Gateway
from tests.conformance import sse_events

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
