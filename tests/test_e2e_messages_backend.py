"""End to end through the real Envoy: a backend declared `api: messages` (the strict Anthropic-shaped
test upstream) serving Chat and Responses clients (the official openai SDK), translated, and Anthropic
clients byte for byte."""

from __future__ import annotations

import http.client
import json

import anthropic
import openai
import pytest

from .conftest import ANTHROPIC_KEY
from .messages_conformance import check_messages_stream, messages_events
from .upstreams import MESSAGES_USAGE, Reply

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def post(gw, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


# -- Anthropic clients: passed through ---------------------------------------------------------------

def test_a_messages_client_passes_through_byte_for_byte(gw):
    body = b'{"model": "claude-sonnet-4-5",  "max_tokens":16, "messages": [{"role": "user", "content": "exact \\u00e9"}]}'
    status, answer = post(gw, "/v1/messages", body, {"x-api-key": "client-key", "anthropic-version": "2023-06-01"})
    assert status == 200
    sent = gw.msgs.last
    assert sent["raw"] == body and sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY  # the sidecar's key for the backend
    assert json.loads(answer)["content"] == [{"type": "text", "text": 'echo: exact \u00e9'}]


def test_the_anthropic_sdk_streams_from_a_messages_backend(gw):
    gw.msgs.script.append(Reply(text="Hi there", reasoning="greeting"))
    with gw.anthropic().messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                        thinking={"type": "enabled", "budget_tokens": 32},
                                        messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].signature.startswith("sig-")
    assert final.usage.cache_read_input_tokens == 3


def test_an_anthropic_error_reaches_a_messages_client_as_it_was(gw):
    gw.msgs.script.append(Reply(error=(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                         "message": "Overloaded"}})))
    with pytest.raises(anthropic.APIStatusError) as e:
        gw.anthropic().messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 529
    assert e.value.response.json() == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


# -- Chat clients ------------------------------------------------------------------------------------

def test_a_chat_client_on_a_messages_backend(gw):
    gw.msgs.script.append(Reply(text="Bonjour", reasoning="French"))
    out = gw.client().chat.completions.create(
        model="claude-sonnet-4-5", max_tokens=64, temperature=0.2, stop=["###"], user="u-3", reasoning_effort="low",
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello in French"}])
    assert out.choices[0].message.content == "Bonjour" and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.model_extra["reasoning_content"] == "French"
    assert out.usage.prompt_tokens == 11 and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens_details.cached_tokens == 3
    sent = gw.msgs.last
    assert sent["path"] == "/v1/messages" and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY and "authorization" not in {k.lower() for k in sent["headers"]}
    assert sent["body"] == {"model": "claude-sonnet-4-5", "max_tokens": 64 + 1024, "system": "Be terse.",
                            "temperature": 0.2, "stop_sequences": ["###"], "metadata": {"user_id": "u-3"},
                            "thinking": {"type": "enabled", "budget_tokens": 1024},
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello in French"}]}]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_tool_loop_on_a_messages_backend(gw, stream):
    client = gw.client()
    gw.msgs.script.extend([Reply(text="Checking.", calls=[("get_weather", '{"city": "Paris"}'),
                                                          ("get_weather", '{"city": "Rome"}')]),
                           Reply(text="Sunny and rainy.")])
    messages: list = [{"role": "user", "content": "Paris and Rome?"}]
    kw = {"model": "claude-sonnet-4-5", "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": True}
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(messages=messages, stream=True, **kw):
            for c in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                slot = calls.setdefault(c.index, {"id": c.id, "name": c.function.name, "arguments": ""})
                slot["arguments"] += c.function.arguments or ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        got = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    else:
        out = client.chat.completions.create(messages=messages, **kw)
        finish = out.choices[0].finish_reason
        got = [(c.id, c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls]
    assert finish == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in got] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in got]}]
    messages += [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i, _, _ in got]
    out = client.chat.completions.create(messages=messages, **kw)
    assert out.choices[0].message.content == "Sunny and rainy."
    sent = gw.msgs.last["body"]
    assert sent["tool_choice"] == {"type": "any"}
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert sent["messages"][1]["role"] == "assistant"
    assert [b["type"] for b in sent["messages"][2]["content"]] == ["tool_result", "tool_result"]


def test_an_anthropic_error_reaches_a_chat_client_in_the_openai_shape(gw):
    gw.msgs.script.append(Reply(error=(429, {"type": "error", "error": {"type": "rate_limit_error",
                                                                         "message": "Number of requests exceeded"}})))
    with pytest.raises(openai.RateLimitError) as e:
        gw.client().chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["message"] == "Number of requests exceeded" and e.value.body["type"] == "rate_limit_error"


def test_a_messages_stream_cut_short_ends_a_chat_stream_with_an_error(gw):
    gw.msgs.script.append(Reply(text="half", cut=True))
    with pytest.raises(openai.APIError) as e:
        for _ in gw.client().chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                                     messages=[{"role": "user", "content": "x"}]):
            pass
    assert "ended before the message stopped" in str(e.value)


# -- Responses clients -------------------------------------------------------------------------------

def test_a_responses_client_on_a_messages_backend_with_previous_response_id(gw):
    client = gw.client()
    gw.msgs.script.extend([Reply(text="First answer"), Reply(text="Second answer")])
    r1 = client.responses.create(model="claude-sonnet-4-5", input="one", instructions="Be brief.", max_output_tokens=40)
    assert r1.output_text == "First answer" and r1.status == "completed"
    assert r1.usage.input_tokens == 11 and r1.usage.input_tokens_details.cached_tokens == 3
    r2 = client.responses.create(model="claude-sonnet-4-5", input="two", previous_response_id=r1.id)
    assert r2.output_text == "Second answer"
    sent = gw.msgs.last["body"]
    assert sent["system"] == "Be brief." if "system" in sent else True
    assert [(m["role"], m["content"][0]["text"]) for m in sent["messages"]] == [
        ("user", "one"), ("assistant", "First answer"), ("user", "two")]


def test_a_responses_stream_and_tool_loop_on_a_messages_backend(gw):
    client = gw.client()
    gw.msgs.script.extend([Reply(text=None, reasoning="weather", calls=[("get_weather", '{"city": "Oslo"}')]),
                           Reply(text="Cold.")])
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    with client.responses.stream(model="claude-sonnet-4-5", input="Oslo?", tools=tools) as s:
        events = [e.type for e in s]
        r1 = s.get_final_response()
    assert events[0] == "response.created" and events[-1] == "response.completed"
    calls = [o for o in r1.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    r2 = client.responses.create(model="claude-sonnet-4-5", previous_response_id=r1.id, tools=tools,
                                 input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "-5C"}])
    assert r2.output_text == "Cold."
    sent = gw.msgs.last["body"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": calls[0].call_id, "content": "-5C"}]


def test_a_raw_messages_passthrough_stream_keeps_anthropics_grammar(gw):
    gw.msgs.script.append(Reply(text="ok", calls=[("get_weather", '{"city": "Oslo"}')]))
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    status, raw = post(gw, "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 200
    msg = check_messages_stream(messages_events(raw))
    assert msg["usage"]["cache_read_input_tokens"] == MESSAGES_USAGE["cache_read_input_tokens"]


# -- count_tokens --------------------------------------------------------------------------------------

def test_count_tokens_goes_to_a_messages_backend(gw):
    out = gw.anthropic().messages.count_tokens(model="claude-sonnet-4-5", system="Be brief.",
                                               messages=[{"role": "user", "content": "hello"}])
    assert out.input_tokens == 42  # the backend's own count
    assert gw.msgs.last["path"] == "/v1/messages/count_tokens"
    assert gw.msgs.last["headers"]["x-api-key"] == ANTHROPIC_KEY


@pytest.mark.parametrize("model", ["llama-3-8b", "gpt-5.3-codex"])
def test_count_tokens_for_an_openai_model_is_the_sidecars_estimate(gw, model):
    messages = [{"role": "user", "content": "x" * 400}]
    raw = gw.anthropic().messages.with_raw_response.count_tokens(model=model, messages=messages)
    expected = len(json.dumps([None, messages, None], separators=(",", ":"))) // 4  # 4 bytes a token
    assert raw.parse().input_tokens == expected and raw.headers["x-gateway-estimated"] == "true"
    assert not gw.chat.requests and not gw.resp.requests  # no OpenAI API counts a Messages request
    with pytest.raises(anthropic.BadRequestError) as e:
        gw.anthropic().messages.count_tokens(model=model, messages=[{"role": "robot", "content": "x"}])
    assert "messages[0].role" in e.value.response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_reasoning_responses_client_hands_claudes_signed_thinking_back(gw, stream):
    """Codex's way (reasoning asked for, store false, the items replayed, a tool loop): the thinking
    Claude signed comes back sealed in the reasoning item and starts the assistant turn of the tool
    result, which Anthropic (and the strict upstream) require for a tool loop with thinking."""
    client = gw.client()
    gw.msgs.script.extend([Reply(text=None, reasoning="need the weather", calls=[("get_weather", '{"city": "Oslo"}')]),
                           Reply(text="Cold.")])
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    kw = {"model": "claude-sonnet-4-5", "tools": tools, "reasoning": {"effort": "low"}, "store": False,
          "include": ["reasoning.encrypted_content"]}
    if stream:
        with client.responses.stream(input="Oslo?", **kw) as s:
            r1 = s.get_final_response()
    else:
        r1 = client.responses.create(input="Oslo?", **kw)
    first = gw.msgs.last["body"]
    assert first["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert [o.type for o in r1.output] == ["reasoning", "function_call"]
    assert r1.output[0].summary[0].text == "need the weather" and r1.output[0].encrypted_content
    call = r1.output[1]
    r2 = client.responses.create(input=[{"role": "user", "content": "Oslo?"},
                                        *[o.model_dump(exclude_none=True) for o in r1.output],
                                        {"type": "function_call_output", "call_id": call.call_id, "output": "-5C"}],
                                 **kw)
    assert r2.output_text == "Cold."
    sent = gw.msgs.last["body"]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    thinking = sent["messages"][1]["content"][0]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "need the weather"
    assert thinking["signature"].startswith("sig-")  # the upstream's own, as it made it


def test_signed_thinking_survives_in_the_turns_the_sidecar_holds(gw):
    client = gw.client()
    gw.msgs.script.extend([Reply(text=None, reasoning="plan", calls=[("get_weather", '{"city": "Oslo"}')]),
                           Reply(text="Cold.")])
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    r1 = client.responses.create(model="claude-sonnet-4-5", input="Oslo?", tools=tools, reasoning={"effort": "low"})
    call = next(o for o in r1.output if o.type == "function_call")
    r2 = client.responses.create(model="claude-sonnet-4-5", previous_response_id=r1.id, tools=tools,
                                 reasoning={"effort": "low"},
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-5C"}])
    assert r2.output_text == "Cold."
    assert gw.msgs.last["body"]["messages"][1]["content"][0]["signature"].startswith("sig-")


def test_without_signed_thinking_a_tool_loop_goes_without_thinking(gw):
    """A chat client keeps no signature: its tool result goes back without thinking (else Anthropic
    refuses the request), and the turn after thinks again."""
    client = gw.client()
    gw.msgs.script.extend([Reply(text=None, reasoning="plan", calls=[("get_weather", '{"city": "Oslo"}')]),
                           Reply(text="Cold.")])
    kw = {"model": "claude-sonnet-4-5", "tools": [WEATHER], "reasoning_effort": "low"}
    out = client.chat.completions.create(messages=[{"role": "user", "content": "Oslo?"}], **kw)
    assert "thinking" in gw.msgs.last["body"]
    calls = out.choices[0].message.tool_calls
    client.chat.completions.create(messages=[{"role": "user", "content": "Oslo?"},
                                             out.choices[0].message.model_dump(exclude_none=True),
                                             {"role": "tool", "tool_call_id": calls[0].id, "content": "-5C"}], **kw)
    assert "thinking" not in gw.msgs.last["body"]
