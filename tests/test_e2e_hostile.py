"""End to end through the real Envoy: hostile upstream answers and hostile client requests.

Upstream side: a test upstream sends each kind of broken answer, both translation directions,
buffered and streamed. The client gets a 502 `bad_upstream_response` in the OpenAI shape, or (mid
stream) an error event and the stream's terminal event; never a 500, an empty 200 or a cut stream.
A stream answered with one JSON body still reaches the client as a whole stream; a status that is
neither a success nor an error (302, 304, 999) is a 502.

Client side: raw HTTP (http.client, a socket for HTTP/1.0) with duplicate keys, escapes, deep
nesting, odd paths, wrong methods and media types. Each case is followed by a good request that
must succeed, so no hostile request leaves the gateway worse off.
"""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

import pytest

from .conformance import check_stream, sse_events
from .upstreams import Reply

CHAT_MODEL, RESPONSES_MODEL = "llama-3", "gpt-5.3-codex"  # a chat-only and a Responses-only backend
CHAT_BODY = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
GOOD_CHAT = {"id": "c1", "object": "chat.completion", "created": 1, "model": CHAT_MODEL,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}
GOOD_RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": RESPONSES_MODEL,
                 "output": [{"type": "message", "id": "m1", "role": "assistant", "status": "completed",
                             "content": [{"type": "output_text", "text": "fine", "annotations": []}]}]}


def call(gw, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = {"content-type": "application/json"} if raw is not None else {}
        conn.request(method, path, body=raw, headers={**hdrs, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(status: int, body: bytes, expected_status: int, code: str) -> dict:
    """The OpenAI error object of an answer that must be exactly that error."""
    assert status == expected_status, (status, body[:300])
    doc = json.loads(body)
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert err["code"] == code, err
    return err


def assert_still_serving(gw) -> None:
    status, _, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "still there?"})
    assert status == 200, body[:300]
    assert json.loads(body)["output"][0]["content"][0]["text"] == "echo: still there?"


# -- broken upstream answers, buffered ----------------------------------------------------------------

def _chat_answer(**change) -> bytes:
    return json.dumps({**GOOD_CHAT, **change}).encode()


def _response_answer(**change) -> bytes:
    return json.dumps({**GOOD_RESPONSE, **change}).encode()


BROKEN_CHAT = {  # what a chat-only backend sends a Responses client's translated request
    "choices_number": (_chat_answer(choices=5), "choices"),
    "created_text": (_chat_answer(created="yesterday"), "created"),
    "usage_text": (_chat_answer(usage={"prompt_tokens": "many"}), "usage.prompt_tokens"),
    "tool_calls_text": (_chat_answer(choices=[{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": "get_weather"}}]), "choices[0].message.tool_calls"),
    "tool_call_without_name": (_chat_answer(choices=[{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}}]),
        "choices[0].message.tool_calls[0].function.name"),
    "empty_body": (b"", "body"),
    "not_json": (b"<html>oops</html>", None),
    "not_an_object": (b"[1, 2]", None),
}
BROKEN_RESPONSES = {  # what a Responses-only backend sends a chat client's translated request
    "output_number": (_response_answer(output=5), "output"),
    "content_text": (_response_answer(output=[{"type": "message", "content": ["hi"]}]), "output[0].content[0]"),
    "created_text": (_response_answer(created_at="yesterday"), "created_at"),
    "usage_text": (_response_answer(usage={"input_tokens": "many"}), "usage.input_tokens"),
    "call_without_name": (_response_answer(output=[{"type": "function_call", "call_id": "c", "arguments": "{}"}]),
                          "output[0].name"),
    "empty_body": (b"", "body"),
}


@pytest.mark.parametrize("case", BROKEN_CHAT)
def test_broken_chat_answer_is_a_502_for_a_responses_client(gw, case):
    raw, field = BROKEN_CHAT[case]
    gw.chat.script.append(Reply(body=raw))
    status, headers, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi"})
    err = error_of(status, body, 502, "bad_upstream_response")
    assert headers["content-type"] == "application/json"
    if field is not None:
        assert f"'{field}'" in err["message"]
    assert_still_serving(gw)


@pytest.mark.parametrize("case", BROKEN_RESPONSES)
def test_broken_responses_answer_is_a_502_for_a_chat_client(gw, case):
    raw, field = BROKEN_RESPONSES[case]
    gw.resp.script.append(Reply(body=raw))
    status, _, body = call(gw, "POST", "/v1/chat/completions", {**CHAT_BODY, "model": RESPONSES_MODEL})
    err = error_of(status, body, 502, "bad_upstream_response")
    assert f"'{field}'" in err["message"]
    assert_still_serving(gw)


def test_a_broken_answer_passed_through_is_left_byte_for_byte(gw):
    raw = _chat_answer(choices=5, usage={"prompt_tokens": "many", "prompt_tokens_details": 7})
    gw.chat.script.append(Reply(body=raw))
    status, _, body = call(gw, "POST", "/v1/chat/completions", CHAT_BODY)  # chat client, chat backend
    assert (status, body) == (200, raw)


# -- broken upstream streams ----------------------------------------------------------------------------

def _chunk(**fields) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": CHAT_MODEL,
                       **fields}).encode()


GOOD_CHUNK = _chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": "par"}, "finish_reason": None}])
BROKEN_CHUNKS = {
    "choices_number": (_chunk(choices=5), "choices"),
    "delta_text": (_chunk(choices=[{"index": 0, "delta": "tial"}]), "choices[0].delta"),
    "content_number": (_chunk(choices=[{"index": 0, "delta": {"content": 5}}]), "choices[0].delta.content"),
    "tool_calls_object": (_chunk(choices=[{"index": 0, "delta": {"tool_calls": {"index": 0}}}]),
                          "choices[0].delta.tool_calls"),
    "usage_text": (_chunk(choices=[], usage={"completion_tokens": "many"}), "usage.completion_tokens"),
    "not_json": (b"{oops", "stream event"),
    "not_an_object": (b"[]", "stream event"),
}


@pytest.mark.parametrize("case", BROKEN_CHUNKS)
def test_broken_chat_chunk_ends_a_responses_stream_with_response_failed(gw, case):
    chunk, field = BROKEN_CHUNKS[case]
    gw.chat.script.append(Reply(events=[GOOD_CHUNK, chunk, _chunk(choices=[{"index": 0, "delta": {},
                                                                             "finish_reason": "stop"}]), b"[DONE]"]))
    status, headers, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    final = check_stream(events)  # schema-valid events, one terminal event, last
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["error"]["code"] == "bad_upstream_response" and f"'{field}'" in events[-2]["error"]["message"]
    assert final["status"] == "failed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "par"
    assert_still_serving(gw)


def _event(kind: str, **fields) -> bytes:
    return json.dumps({"type": kind, "sequence_number": 0, **fields}).encode()


CREATED = _event("response.created", response={**GOOD_RESPONSE, "status": "in_progress", "output": []})
BROKEN_EVENTS = {
    "delta_number": (_event("response.output_text.delta", item_id="m1", output_index=0, content_index=0, delta=5),
                     "delta"),
    "item_text": (_event("response.output_item.added", output_index=0, item="function_call"), "item"),
    "call_name_number": (_event("response.output_item.added", output_index=0,
                                item={"type": "function_call", "id": "fc", "call_id": "c", "name": 7}), "item.name"),
    "completed_usage_text": (_event("response.completed", response={**GOOD_RESPONSE, "usage": {"output_tokens": []}}),
                             "response.usage.output_tokens"),
    "created_response_text": (_event("response.created", response="yes"), "response"),
    "type_number": (json.dumps({"type": 5}).encode(), "type"),
}


@pytest.mark.parametrize("case", BROKEN_EVENTS)
def test_broken_responses_event_ends_a_chat_stream_with_an_error_chunk_and_done(gw, case):
    event, field = BROKEN_EVENTS[case]
    first = [] if case == "created_response_text" else [CREATED]
    gw.resp.script.append(Reply(events=[*first, event]))
    status, headers, body = call(gw, "POST", "/v1/chat/completions",
                                 {**CHAT_BODY, "model": RESPONSES_MODEL, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"[DONE]") == 1
    chunks = sse_events(body)
    err = chunks[-1]["error"]
    assert err["code"] == "bad_upstream_response" and f"'{field}'" in err["message"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert_still_serving(gw)


def test_a_chat_stream_that_stops_without_finishing_still_ends(gw):
    gw.chat.script.append(Reply(events=[GOOD_CHUNK]))
    status, _, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi", "stream": True})
    events = sse_events(body)
    assert status == 200 and check_stream(events)["status"] == "failed"
    assert events[-2]["error"]["code"] == "upstream_incomplete"


# -- a stream asked for, one JSON body answered (a provider that ignores `stream`) ------------------------

CALLING_CHAT = _chat_answer(choices=[{"index": 0, "finish_reason": "tool_calls", "message": {
    "role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_w", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Bern"}'}}]}}],
    usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
WEATHER = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}


def test_a_json_chat_answer_reaches_a_streaming_responses_client_as_a_whole_stream(gw):
    gw.chat.script.append(Reply(body=CALLING_CHAT))
    status, headers, body = call(gw, "POST", "/v1/responses",
                                 {"model": CHAT_MODEL, "input": "weather?", "stream": True, "tools": [WEATHER]})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert gw.chat.last["body"]["stream"] is True  # the upstream was asked for a stream, and ignored it
    events = sse_events(body)
    final = check_stream(events)  # schema-valid events, ordered item and part lifecycles, one terminal event
    assert events[-1]["type"] == "response.completed" and final["status"] == "completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Checking."
    [args] = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args == '{"city": "Bern"}'
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (11, 7)


def test_the_openai_sdk_streams_a_json_chat_answer_to_its_end(gw):
    gw.chat.script.append(Reply(body=_chat_answer(choices=[{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "a whole answer"}}])))
    events = list(gw.client().responses.create(model=CHAT_MODEL, input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "a whole answer"
    assert events[-1].response.output_text == "a whole answer"
    # the streamed response is kept like any other: the next turn continues from it
    gw.chat.script.append(Reply(text="again"))
    nxt = gw.client().responses.create(model=CHAT_MODEL, input="more", previous_response_id=events[-1].response.id)
    assert nxt.output_text == "again"
    assert [m["content"] for m in gw.chat.last["body"]["messages"]] == ["hi", "a whole answer", "more"]


def test_the_openai_sdk_streams_a_json_responses_answer_as_chat_chunks(gw):
    gw.resp.script.append(Reply(body=_response_answer(usage={"input_tokens": 5, "output_tokens": 2,
                                                             "total_tokens": 7})))
    chunks = list(gw.client().chat.completions.create(model=RESPONSES_MODEL, messages=CHAT_BODY["messages"],
                                                      stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 2)


def test_a_json_responses_answer_with_a_tool_call_reaches_a_streaming_chat_client(gw):
    gw.resp.script.append(Reply(body=_response_answer(output=[
        {"type": "function_call", "id": "fc_1", "call_id": "call_w", "name": "weather",
         "arguments": '{"city": "Bern"}', "status": "completed"}])))
    status, headers, body = call(gw, "POST", "/v1/chat/completions",
                                 {**CHAT_BODY, "model": RESPONSES_MODEL, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"[DONE]") == 1
    deltas = [c["choices"][0] for c in sse_events(body)]
    calls = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
    assert calls[0]["id"] == "call_w" and calls[0]["function"]["name"] == "weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Bern"}'
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_a_broken_json_answer_to_a_stream_ends_it_like_a_broken_stream(gw):
    gw.chat.script.append(Reply(body=b"<html>busy</html>"))
    status, headers, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert check_stream(events)["status"] == "failed"
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["error"]["code"] == "bad_upstream_response" and "not JSON" in events[-2]["error"]["message"]
    gw.resp.script.append(Reply(body=_response_answer(output=5)))
    status, headers, body = call(gw, "POST", "/v1/chat/completions",
                                 {**CHAT_BODY, "model": RESPONSES_MODEL, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    err = sse_events(body)[-1]["error"]
    assert err["code"] == "bad_upstream_response" and "'output'" in err["message"]
    assert_still_serving(gw)


def test_a_json_answer_to_a_stream_passed_through_is_left_byte_for_byte(gw):
    raw = _chat_answer()
    gw.chat.script.append(Reply(body=raw))
    status, headers, body = call(gw, "POST", "/v1/chat/completions", {**CHAT_BODY, "stream": True})
    assert (status, headers["content-type"], body) == (200, "application/json", raw)


# -- statuses that are neither a success nor an error ------------------------------------------------------

@pytest.mark.parametrize("status", [302, 304, 999])
@pytest.mark.parametrize("client_api", ["responses", "chat"])
def test_an_odd_upstream_status_is_a_502_for_a_translated_request(gw, status, client_api):
    upstream, path, body = (gw.chat, "/v1/responses", {"model": CHAT_MODEL, "input": "hi"}) if client_api == "responses" \
        else (gw.resp, "/v1/chat/completions", {**CHAT_BODY, "model": RESPONSES_MODEL})
    upstream.script.append(Reply(error=(status, {"moved": "elsewhere"})))
    got, headers, answer = call(gw, "POST", path, body)
    err = error_of(got, answer, 502, "bad_upstream_response")
    assert err["message"] == f"the upstream returned a response the gateway cannot use: status {status}"
    assert headers["content-type"] == "application/json"
    assert_still_serving(gw)


def test_an_odd_upstream_status_passed_through_is_left_alone(gw):
    gw.chat.script.append(Reply(error=(302, {"moved": "elsewhere"})))
    status, _, body = call(gw, "POST", "/v1/chat/completions", CHAT_BODY)
    assert (status, json.loads(body)) == (302, {"moved": "elsewhere"})


# -- hostile client requests --------------------------------------------------------------------------

def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE_BODIES = {  # raw body -> (status, code)
    "escaped_duplicate_model": (b'{"model": "llama-3", "\\u006dodel": "gpt-5.3-codex", "input": "hi"}', 400,
                                "duplicate_key"),
    "duplicate_stream": (b'{"model": "llama-3", "input": "hi", "stream": false, "str\\u0065am": true}', 400,
                         "duplicate_key"),
    "duplicate_previous_response_id": (b'{"model": "llama-3", "input": "hi", "previous_response_id": "resp_a", '
                                       b'"previous_response_id": "resp_b"}', 400, "duplicate_key"),
    "deep_metadata": (('{"model": "llama-3", "input": "hi", "metadata": ' + _nested(300) + "}").encode(), 400,
                      "invalid_json"),
    "deep_tool_schema": (('{"model": "llama-3", "input": "hi", "tools": [{"type": "function", "name": "f", '
                          '"parameters": ' + _nested(250) + "}]}").encode(), 400, "invalid_json"),
    "duplicate_key_and_deep_array": (b'{"model": "llama-3", "model": "llama-3", "input": ' + b"[" * 2000 + b"]" * 2000
                                     + b"}", 400, "invalid_json"),
    "empty_json_body": (b"   ", 400, "invalid_json"),
}


@pytest.mark.parametrize("case", HOSTILE_BODIES)
def test_hostile_body_is_a_clear_4xx(gw, case):
    raw, status, code = HOSTILE_BODIES[case]
    got, _, body = call(gw, "POST", "/v1/responses", raw)
    err = error_of(got, body, status, code)
    if case.startswith("deep_"):
        assert "128 levels" in err["message"]
    assert gw.chat.requests == []  # nothing reached the backend
    assert_still_serving(gw)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/chat/completions", "POST"), ("PATCH", "/v1/chat/completions", "POST"),
    ("GET", "/v1/responses", "POST"), ("PUT", "/v1/responses", "POST"),
    ("POST", "/v1/responses/resp_abc", "GET, DELETE"), ("GET", "/v1/responses/resp_abc/cancel", "POST"),
    ("DELETE", "/v1/responses/resp_abc/input_items", "GET"), ("POST", "/v1/models", "GET"),
    ("GET", "/v1/responses/compact", "POST"),
])
def test_wrong_method_on_a_sidecar_path_is_a_405_with_allow(gw, method, path, allow):
    status, headers, body = call(gw, method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None)
    error_of(status, body, 405, "method_not_allowed")
    assert headers["allow"] == allow
    assert gw.chat.requests == [] and gw.resp.requests == []
    assert_still_serving(gw)


def test_empty_post_to_an_api_path_is_a_400(gw):
    for path in ("/v1/chat/completions", "/v1/responses"):
        status, _, body = call(gw, "POST", path, b"")
        error_of(status, body, 400, "missing_body")
    assert_still_serving(gw)


def test_other_openai_paths_still_pass_through(gw):
    status, _, body = call(gw, "POST", "/v1/embeddings", {"model": "text-embedding-small", "input": "x"})
    assert status == 200 and json.loads(body)["object"] == "list"
    assert gw.chat.last["path"] == "/v1/embeddings"


@pytest.mark.parametrize("path", ["//v1/responses", "/v1//responses", "/v1/chat/../responses", "/v1/./responses",
                                  "/v1%2Fresponses", "/v1/%72esponses"])
def test_every_spelling_of_a_path_gets_the_sidecars_decision(gw, path):
    status, _, body = call(gw, "POST", path, {"model": CHAT_MODEL, "input": "spelt oddly"})
    assert status == 200, body[:300]
    assert json.loads(body)["object"] == "response"  # translated: the sidecar saw /v1/responses
    assert gw.chat.last["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("ctype", "status"), [
    ("Application/JSON", 200), ("application/json; charset=UTF-8", 200), ("application/json;charset=\"utf-8\"", 200),
    ("application/vnd.openai+json", 200), ("text/not-json-really", 415), ("application/jsonx", 415),
    ("application/json; charset=utf-16", 415), ("text/plain", 415),
])
def test_media_types_are_parsed_not_substring_matched(gw, ctype, status):
    got, _, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi"}, {"content-type": ctype})
    if status == 200:
        assert got == 200 and json.loads(body)["object"] == "response"
    else:
        error_of(got, body, 415, "unsupported_media_type")
    assert_still_serving(gw)


def _raw(gw, request: bytes) -> bytes:
    """One answer to raw bytes: read until it is complete (content-length) or the connection closes.
    A 30 s timeout, never reached when Envoy answers, fails the test if it does not."""
    url = urlsplit(gw.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            head, sep, payload = out.partition(b"\r\n\r\n")
            length = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if sep and length and len(payload) >= int(length[0]):
                break
    return out


def test_http_10_request_gets_a_json_answer(gw):
    body = json.dumps({"model": CHAT_MODEL, "input": "old client"}).encode()
    out = _raw(gw, b"POST /v1/responses HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert json.loads(payload)["output"][0]["content"][0]["text"] == "echo: old client"
    out = _raw(gw, b"GET /v1/chat/completions HTTP/1.0\r\n\r\n")
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 405") and json.loads(payload)["error"]["code"] == "method_not_allowed"
    assert_still_serving(gw)


def test_content_length_and_chunked_together_read_as_chunked(gw):
    body = json.dumps({"model": CHAT_MODEL, "input": "smuggled?"}).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    out = _raw(gw, b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 3\r\n"
               b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n" + chunked)
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out[:300]
    assert b"echo: smuggled?" in payload
    assert gw.chat.last["body"]["messages"][-1]["content"] == "smuggled?"
    assert_still_serving(gw)


_POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
UNREADABLE = {  # requests Envoy cannot read as HTTP: (bytes, status, Envoy's code for the rule)
    "two_content_lengths": (_POST + b"content-length: 3\r\ncontent-length: 5\r\n\r\n{}", 400, "http1.codec_error"),
    "content_length_list": (_POST + b"content-length: 2, 3\r\n\r\n{}", 400, "http1.codec_error"),
    "content_length_text": (_POST + b"content-length: two\r\n\r\n{}", 400, "http1.codec_error"),
    "negative_content_length": (_POST + b"content-length: -1\r\n\r\n{}", 400, "http1.codec_error"),
    "space_in_header_name": (_POST + b"x bad: 1\r\ncontent-length: 2\r\n\r\n{}", 400, "http1.codec_error"),
    "garbage_request_line": (b"GARBAGE\r\n\r\n", 400, "http1.codec_error"),
    "unknown_transfer_coding": (_POST + b"transfer-encoding: gzip\r\n\r\n", 501, "http1.invalid_transfer_encoding"),
    "http11_without_host": (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}", 400, "missing_host_header"),
    "escaped_nul_in_path": (b"POST /v1/chat/%00 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", 400,
                            "path_normalization_failed"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_request_envoy_cannot_read_gets_a_json_error_and_goes_nowhere(gw, case):
    """Refused by Envoy before the sidecar or any upstream sees it, answered at once in the OpenAI shape
    (held for the processor, this answer used to be lost: an empty reply)."""
    request, status, code = UNREADABLE[case]
    out = _raw(gw, request)
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), out[:300]
    assert b"content-type: application/json" in head.lower()
    err = error_of(status, payload, status, code)
    assert err["type"] == "invalid_request_error" and "refused before it was read" in err["message"]
    assert gw.chat.requests == [] and gw.resp.requests == []  # no upstream received any of it
    assert_still_serving(gw)


def test_a_chunked_body_broken_midway_reaches_no_upstream(gw):
    """Framing that breaks after the headers: Envoy drops the connection without an answer (its codec
    resets the stream while the processor holds the reply; docs/security.md), and nothing of the
    request is forwarded."""
    out = _raw(gw, _POST + b"transfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\nZZ\r\nxx\r\n")
    assert out == b""
    assert gw.chat.requests == [] and gw.resp.requests == []
    assert_still_serving(gw)


def test_connect_gets_a_json_404(gw):
    """No route takes a tunnel: Envoy's 404 in the OpenAI shape, at once (no processor waits on its body)."""
    out = _raw(gw, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), out[:300]
    error_of(404, payload, 404, "route_not_found")
    assert_still_serving(gw)


_HUGE = 70 * 1024 * 1024  # over Envoy's 64 MiB buffer (per_connection_buffer_limit_bytes in deploy/envoy.yaml)


def _huge_json(**fields) -> bytes:
    head = json.dumps(fields).encode()[:-1] + b', "pad": "'
    return head + b"x" * (_HUGE - len(head) - 2) + b'"}'


def test_an_answer_on_another_path_is_never_buffered_whatever_its_size(gw):
    """A large embeddings batch passes through as it is: nothing buffers answers off the two API paths."""
    big = _huge_json(object="list", data=[], model="text-embedding-small")
    gw.chat.script.append(Reply(body=big))
    status, _, body = call(gw, "POST", "/v1/embeddings", {"model": "text-embedding-small", "input": "x"})
    assert status == 200 and len(body) == len(big) and body == big
    assert_still_serving(gw)


def test_a_passed_through_answer_read_for_its_usage_over_the_buffer_is_a_502(gw):
    """An API answer the sidecar reads for its usage, over Envoy's 64 MiB buffer: the upstream's fault in
    the client's shape, as a translated one is (never Envoy's 500 or a cut answer)."""
    gw.chat.script.append(Reply(body=_huge_json(**{**GOOD_CHAT, "model": "strict-big"})))
    status, _, body = call(gw, "POST", "/v1/chat/completions",
                           {"model": "strict-big", "messages": [{"role": "user", "content": "a lot, please"}]})
    err = error_of(status, body, 502, "bad_upstream_response")
    assert "64 MiB" in err["message"]
    assert_still_serving(gw)


def test_a_translated_answer_over_the_buffer_is_a_502(gw):
    gw.chat.script.append(Reply(body=_huge_json(**GOOD_CHAT)))
    status, _, body = call(gw, "POST", "/v1/responses", {"model": CHAT_MODEL, "input": "a lot, please"})
    err = error_of(status, body, 502, "bad_upstream_response")
    assert "64 MiB" in err["message"]
    assert_still_serving(gw)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/responses/resp_1/"), ("DELETE", "/v1/responses/resp_1/"), ("POST", "/v1/responses/"),
    ("POST", "/v1/responses/resp_1/cancel/"), ("GET", "/v1/responses/resp_1;x"), ("GET", "/v1/responses/resp_1/."),
    ("POST", "/v1/chat/completions/"), ("GET", "/v1/responses/resp_1/input_items/"), ("POST", "/responses"),
    ("GET", "/responses/resp_1"), ("GET", "/openai/v1/responses/resp_1"), ("POST", "/chat/completions"),
    ("GET", "/v1/responses;/resp_1"), ("GET", "/V1/responses/resp_1"),
])
def test_another_spelling_of_a_sidecar_path_never_reaches_an_upstream(gw, method, path):
    """An upstream that reads `/v1/responses/resp_1/` as `/v1/responses/resp_1` (many do) would otherwise
    serve it with the gateway's key and without the sidecar's tenancy check or translation."""
    body = {"model": CHAT_MODEL, "input": "x", "previous_response_id": "resp_1"} if method == "POST" else None
    status, _, raw = call(gw, method, path, body)
    err = error_of(status, raw, 404, "invalid_url")
    normalised = path.removesuffix(".")  # Envoy's normalize_path: `/x/.` is `/x/`
    assert err["message"] == f"Invalid URL ({method} {normalised})"
    assert gw.chat.requests == [] and gw.resp.requests == []
    assert_still_serving(gw)


def test_input_token_counting_is_passed_to_a_responses_backend(gw):
    status, _, raw = call(gw, "POST", "/v1/responses/input_tokens", {"model": RESPONSES_MODEL, "input": "count these"})
    assert status == 200 and json.loads(raw) == {"object": "response.input_tokens", "input_tokens": 2}
    assert gw.resp.requests and gw.resp.last["path"] == "/v1/responses/input_tokens"
    assert gw.resp.last["body"] == {"model": RESPONSES_MODEL, "input": "count these"}
    status, _, raw = call(gw, "POST", "/v1/responses/input_tokens", {"model": CHAT_MODEL, "input": "count"})
    error_of(status, raw, 400, "unsupported_api")


@pytest.mark.parametrize("client_api", ["responses", "chat"])
def test_an_upstream_that_drops_mid_stream_is_an_error_the_client_sees(gw, client_api):
    """Envoy cannot add to an answer whose upstream connection broke (it resets the client's stream), so a
    translated stream then ends without its terminal event, but never looks complete: the SDK raises on
    the unfinished body rather than ending quietly."""
    import threading

    import openai

    client, drop = gw.client(), threading.Event()
    seen = []
    if client_api == "responses":
        gw.chat.script.append(Reply(text="partial answer", cut=True, drop=drop))
        with pytest.raises(openai.APIConnectionError):
            for event in client.responses.create(model=CHAT_MODEL, input="hi", stream=True):
                seen.append(event.type)
                drop.set()  # the stream has started: now the upstream's connection breaks
        assert seen[0] == "response.created"
        assert not {"response.completed", "response.failed", "response.incomplete"} & set(seen)
    else:
        gw.resp.script.append(Reply(text="partial answer", cut=True, drop=drop))
        with pytest.raises(openai.APIConnectionError):
            for chunk in client.chat.completions.create(model=RESPONSES_MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True):
                seen.append(chunk.choices[0].finish_reason if chunk.choices else "usage")
                drop.set()
        assert seen and not any(seen)  # chunks arrived, none of them a finish
    assert_still_serving(gw)
