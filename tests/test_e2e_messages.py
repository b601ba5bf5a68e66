"""End to end through the real Envoy with the official `anthropic` SDK: Messages clients on a chat-only
backend (the strict vLLM-like test upstream), buffered, streamed with the SDK's accumulation, a tool
loop with thinking handed back, and errors in Anthropic's shape."""

from __future__ import annotations

import http.client
import json

import anthropic
import pytest

from .messages_conformance import check_messages_stream, messages_events
from .upstreams import Reply

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# the chat test upstream's usage: 11 prompt tokens (3 of them cached), 7 completion tokens
USAGE = {"input_tokens": 8, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0, "output_tokens": 7}


def call(gw, method: str, path: str, body: dict | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) as sent, read without the SDK (which raises on `error` events)."""
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def _usage(u) -> dict:
    return {k: getattr(u, k) for k in USAGE}


def test_messages_create_on_a_chat_only_model(gw):
    gw.chat.script.append(Reply(text="Bonjour"))
    out = gw.anthropic().messages.create(
        model="llama-3-8b", max_tokens=64, stop_sequences=["###"], metadata={"user_id": "user-7"},
        extra_body={"temperature": 0.3},  # older Anthropic SDKs and Claude Code send it; the newest SDK has no argument
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Say hello in French"}])
    assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
    assert [(b.type, b.text) for b in out.content] == [("text", "Bonjour")]
    assert out.stop_reason == "end_turn" and out.stop_sequence is None
    assert _usage(out.usage) == USAGE
    sent = gw.chat.last
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"] == {"model": "llama-3-8b", "max_completion_tokens": 64, "temperature": 0.3, "user": "user-7",
                            "stop": ["###"], "messages": [{"role": "system", "content": "You are terse."},
                                                          {"role": "user", "content": "Say hello in French"}]}
    assert sent["headers"]["authorization"] == "Bearer sk-test-upstream-secret"


def test_top_k_dropped_is_named_in_a_header(gw):
    raw = gw.anthropic().messages.with_raw_response.create(
        model="llama-3-8b", max_tokens=16, extra_body={"top_k": 3}, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-dropped-fields"] == "top_k"
    assert raw.parse().content[0].text == "echo: hi"


def test_messages_stream_accumulates_thinking_and_text(gw):
    gw.chat.script.append(Reply(text="It is sunny.", reasoning="The user asks about weather."))
    with gw.anthropic().messages.stream(model="llama-3-8b", max_tokens=64,
                                        messages=[{"role": "user", "content": "Weather?"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "It is sunny."
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "The user asks about weather." and final.content[0].signature
    assert final.content[1].text == "It is sunny."
    assert final.stop_reason == "end_turn" and _usage(final.usage) == USAGE
    assert gw.chat.last["body"]["stream_options"] == {"include_usage": True}


def test_the_raw_stream_follows_anthropics_grammar(gw):
    gw.chat.script.append(Reply(text="Checking both.", reasoning="two cities",
                                calls=[("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]))
    body = {"model": "llama-3-8b", "max_tokens": 64, "stream": True, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "Paris and Rome?"}]}
    status, headers, raw = call(gw, "POST", "/v1/messages", body, {"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    msg = check_messages_stream(messages_events(raw))
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert [b["input"] for b in msg["content"][2:]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert msg["stop_reason"] == "tool_use" and msg["usage"]["output_tokens"] == 7


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_with_parallel_calls_and_thinking_handed_back(gw, stream):
    client = gw.anthropic()
    gw.chat.script.extend([Reply(text=None, reasoning="need both", calls=[("get_weather", '{"city":"Paris"}'),
                                                                          ("get_weather", '{"city":"Rome"}')]),
                           Reply(text="Paris sunny, Rome rainy.")])
    messages: list = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    kw = {"model": "llama-3-8b", "max_tokens": 128, "tools": [WEATHER], "tool_choice": {"type": "auto"},
          "thinking": {"type": "enabled", "budget_tokens": 2048}}
    if stream:
        with client.messages.stream(messages=messages, **kw) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(messages=messages, **kw)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert first.content[0].type == "thinking" and first.content[0].signature
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                     {"type": "tool_result", "tool_use_id": uses[1].id, "content": "no data", "is_error": True}]}]
    second = client.messages.create(messages=messages, **kw)
    assert second.content[0].text == "Paris sunny, Rome rainy." and second.stop_reason == "end_turn"
    sent = gw.chat.last["body"]
    assert sent["reasoning_effort"] == "low" and sent["tool_choice"] == "auto"
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                               "parameters": WEATHER["input_schema"]}}]
    assert sent["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": uses[0].id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": uses[1].id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}
    assert sent["messages"][2:] == [{"role": "tool", "tool_call_id": uses[0].id, "content": "sunny"},
                                    {"role": "tool", "tool_call_id": uses[1].id, "content": "Error: no data"}]


def test_tool_choice_any_without_parallel_calls(gw):
    gw.chat.script.append(Reply(text=None, calls=[("get_weather", '{"city":"Oslo"}')]))
    out = gw.anthropic().messages.create(model="llama-3-8b", max_tokens=32, tools=[WEATHER],
                                         tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                         messages=[{"role": "user", "content": "Oslo?"}])
    assert out.content[0].type == "tool_use" and out.content[0].input == {"city": "Oslo"}
    assert gw.chat.last["body"]["tool_choice"] == "required"
    assert gw.chat.last["body"]["parallel_tool_calls"] is False


def test_max_tokens_is_the_stop_reason_when_the_model_ran_out(gw):
    gw.chat.script.append(Reply(text="partial", finish="length"))
    out = gw.anthropic().messages.create(model="llama-3-8b", max_tokens=4, messages=[{"role": "user", "content": "long"}])
    assert out.stop_reason == "max_tokens"


def _anthropic_error(e: anthropic.APIStatusError) -> dict:
    body = e.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


def test_refusals_come_in_anthropics_shape(gw):
    client = gw.anthropic()
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="llama-3-8b", max_tokens=8, messages=[{"role": "user", "content": "x"}],
                               extra_body={"container": "c1"})
    err = _anthropic_error(e.value)
    assert err["type"] == "invalid_request_error" and "'container'" in err["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert _anthropic_error(e.value)["type"] == "not_found_error"
    status, headers, raw = call(gw, "GET", "/v1/messages")  # a wrong method, refused before any body is read
    assert status == 405 and headers["allow"] == "POST"
    assert json.loads(raw) == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "GET is not supported on /v1/messages; use POST"}}


@pytest.mark.parametrize(("status", "kind", "exc"), [
    (429, "rate_limit_error", anthropic.RateLimitError), (401, "authentication_error", anthropic.AuthenticationError),
    (503, "overloaded_error", anthropic.APIStatusError), (500, "api_error", anthropic.InternalServerError)])
def test_upstream_errors_keep_their_status_in_anthropics_shape(gw, status, kind, exc):
    gw.chat.script.append(Reply(error=(status, {"error": {"message": "upstream says no", "type": "x", "code": None}})))
    with pytest.raises(exc) as e:
        gw.anthropic().messages.create(model="llama-3-8b", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == status
    assert _anthropic_error(e.value) == {"type": kind, "message": "upstream says no"}


def test_a_stream_cut_short_ends_with_an_error_event(gw):
    gw.chat.script.append(Reply(text="half an answer", cut=True))
    with pytest.raises(anthropic.APIStatusError) as e, gw.anthropic().messages.stream(
            model="llama-3-8b", max_tokens=32, messages=[{"role": "user", "content": "x"}]) as stream:
        for _ in stream:
            pass
    assert "ended before the model finished" in str(e.value)
    body = {"model": "llama-3-8b", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    gw.chat.script.append(Reply(text="half an answer", cut=True))
    msg = check_messages_stream(messages_events(call(gw, "POST", "/v1/messages", body)[2]))
    assert msg["error"]["type"] == "api_error" and msg["content"][0]["text"] == "half an answer"


def test_the_tenant_is_named_by_x_api_key(gw):
    """Anthropic clients authenticate with x-api-key; the request is served the same either way."""
    gw.chat.script.append(Reply(text="ok"))
    status, _, raw = call(gw, "POST", "/v1/messages", {"model": "llama-3-8b", "max_tokens": 8,
                                                        "messages": [{"role": "user", "content": "x"}]},
                          {"x-api-key": "tenant-a", "anthropic-version": "2023-06-01",
                           "anthropic-beta": "prompt-caching-2024-07-31"})
    assert status == 200 and json.loads(raw)["content"][0]["text"] == "ok"


# -- a Responses-only model (the strict Codex-like test upstream) --------------------------------------

RESP_USAGE = {"input_tokens": 8, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0, "output_tokens": 7}


def test_messages_create_on_a_responses_only_model(gw):
    gw.resp.script.append(Reply(text="Hello from codex", reasoning="short answer"))
    out = gw.anthropic().messages.create(model="gpt-5.3-codex", max_tokens=50, system="Be brief.",
                                         stop_sequences=["###"], metadata={"user_id": "u-9"},
                                         thinking={"type": "enabled", "budget_tokens": 2048},
                                         messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in out.content] == ["thinking", "text"]
    assert out.content[0].thinking == "short answer" and out.content[0].signature
    assert out.content[1].text == "Hello from codex" and out.stop_reason == "end_turn"
    assert _usage(out.usage) == RESP_USAGE
    sent = gw.resp.last
    assert sent["path"] == "/v1/responses"
    assert sent["headers"]["authorization"] == "Bearer client-key"  # the SDK's x-api-key, as OpenAI reads keys
    assert sent["body"] == {"model": "gpt-5.3-codex", "input": [{"type": "message", "role": "user", "content": "hi"}],
                            "instructions": "Be brief.", "max_output_tokens": 50, "store": False,
                            "safety_identifier": "u-9", "reasoning": {"effort": "low", "summary": "auto"},
                            "include": ["reasoning.encrypted_content"]}


def test_messages_stream_on_a_responses_only_model(gw):
    gw.resp.script.append(Reply(text="It is sunny.", reasoning="weather question"))
    with gw.anthropic().messages.stream(model="gpt-5.3-codex", max_tokens=64,
                                        messages=[{"role": "user", "content": "Weather?"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "It is sunny."
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", "weather question"), ("text", "It is sunny.")]
    assert final.stop_reason == "end_turn" and _usage(final.usage) == RESP_USAGE
    body = {"model": "gpt-5.3-codex", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    gw.resp.script.append(Reply(text="ok", calls=[("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Rome"}')]))
    msg = check_messages_stream(messages_events(call(gw, "POST", "/v1/messages", body)[2]))
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["input"] for b in msg["content"][1:]] == [{"city": "Paris"}, {"city": "Rome"}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_on_a_responses_only_model(gw, stream):
    client = gw.anthropic()
    gw.resp.script.extend([Reply(text=None, reasoning="need both", calls=[("get_weather", '{"city":"Paris"}'),
                                                                          ("get_weather", '{"city":"Rome"}')]),
                           Reply(text="Paris sunny, Rome rainy.")])
    messages: list = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    kw = {"model": "gpt-5.3-codex", "max_tokens": 128, "tools": [WEATHER],
          "tool_choice": {"type": "any", "disable_parallel_tool_use": False}}
    if stream:
        with client.messages.stream(messages=messages, **kw) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(messages=messages, **kw)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "sunny"}
                                              for u in uses]}]
    second = client.messages.create(messages=messages, **kw)
    assert second.content[0].text == "Paris sunny, Rome rainy."
    sent = gw.resp.last["body"]
    assert sent["tool_choice"] == "required"
    assert sent["tools"] == [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                              "parameters": WEATHER["input_schema"], "strict": False}]
    assert [i["type"] for i in sent["input"]] == ["message", "function_call", "function_call", "function_call_output",
                                                  "function_call_output"]
    assert [i["call_id"] for i in sent["input"][1:]] == [uses[0].id, uses[1].id, uses[0].id, uses[1].id]


def test_stop_sequences_dropped_for_a_responses_model_are_named(gw):
    raw = gw.anthropic().messages.with_raw_response.create(
        model="gpt-5.3-codex", max_tokens=16, stop_sequences=["END"], messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-dropped-fields"] == "stop_sequences"
    assert "stop" not in gw.resp.last["body"]


def test_a_responses_upstream_error_in_anthropics_shape(gw):
    gw.resp.script.append(Reply(error=(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                        "code": "rate_limit_exceeded"}})))
    with pytest.raises(anthropic.RateLimitError) as e:
        gw.anthropic().messages.create(model="gpt-5.3-codex", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert _anthropic_error(e.value) == {"type": "rate_limit_error", "message": "Rate limit reached"}
