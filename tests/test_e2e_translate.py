"""End to end through the real Envoy with the official openai client: non-streaming translation both ways."""

from __future__ import annotations

import json

import openai
import pytest

from .conformance import validate_response
from .upstreams import Reply

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_chat_client_to_responses_only_model(gw):
    gw.resp.script.append(Reply(text="Hello from codex", reasoning="thinking it over"))
    out = gw.client().chat.completions.create(
        model="gpt-5.3-codex", max_tokens=50, reasoning_effort="low", temperature=0.2, user="u1",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello from codex"
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.model_extra["reasoning_content"] == "thinking it over"
    assert out.usage.prompt_tokens == 11 and out.usage.completion_tokens == 7 and out.usage.total_tokens == 18
    assert out.usage.prompt_tokens_details.cached_tokens == 3
    assert out.usage.completion_tokens_details.reasoning_tokens == 2
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    sent = gw.resp.last
    assert sent["path"] == "/v1/responses"
    assert sent["body"]["max_output_tokens"] == 50
    assert sent["body"]["reasoning"] == {"effort": "low"}
    assert sent["body"]["input"][0] == {"type": "message", "role": "system", "content": "be brief"}
    assert "messages" not in sent["body"]


def test_responses_client_to_chat_only_backend(gw):
    gw.chat.script.append(Reply(text="Bonjour", reasoning="user wants French"))
    client = gw.client()
    r = client.responses.create(model="llama-3-8b", input="Say hello in French", instructions="You are terse.",
                                max_output_tokens=64, temperature=0.5, metadata={"k": "v"})
    assert r.output_text == "Bonjour"
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.usage.input_tokens == 11 and r.usage.output_tokens_details.reasoning_tokens == 2
    raw = client.responses.with_raw_response.create(model="llama-3-8b", input="again")
    validate_response(json.loads(raw.text))
    sent = gw.chat.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Say hello in French"}]
    assert sent["body"]["max_completion_tokens"] == 64
    assert sent["headers"]["authorization"] == "Bearer sk-test-upstream-secret"


def test_tool_round_trip_over_several_turns_responses_client(gw):
    client = gw.client()
    gw.chat.script.extend([Reply(text=None, calls=[("get_weather", '{"city":"Paris"}'),
                                                   ("get_weather", '{"city":"Rome"}')]),
                           Reply(text="Paris 20C, Rome 25C")])
    tools = [{"type": "function", "name": "get_weather", "description": "Weather",
              "parameters": WEATHER["function"]["parameters"]}]
    r1 = client.responses.create(model="qwen3-8b", input="weather in Paris and Rome?", tools=tools)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    history = [{"role": "user", "content": "weather in Paris and Rome?"}]
    history += [c.model_dump(exclude_none=True) for c in calls]
    history += [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    r2 = client.responses.create(model="qwen3-8b", input=history, tools=tools)
    assert r2.output_text == "Paris 20C, Rome 25C"
    msgs = gw.chat.last["body"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == [c.call_id for c in calls]
    assert gw.chat.last["body"]["tools"][0]["function"]["name"] == "get_weather"


def test_tool_round_trip_chat_client_to_responses_model(gw):
    client = gw.client()
    gw.resp.script.extend([Reply(text=None, calls=[("get_weather", '{"city":"Oslo"}')]), Reply(text="Cold.")])
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    out = client.chat.completions.create(model="gpt-5.3-codex", messages=messages, tools=[WEATHER],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert gw.resp.last["body"]["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert gw.resp.last["body"]["tools"][0]["name"] == "get_weather"
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "-5C"}]
    out2 = client.chat.completions.create(model="gpt-5.3-codex", messages=messages, tools=[WEATHER])
    assert out2.choices[0].message.content == "Cold."
    items = gw.resp.last["body"]["input"]
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert items[2]["call_id"] == call.id


def test_images_both_ways(gw):
    url = "data:image/png;base64,iVBORw0KGgo="
    client = gw.client()
    client.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
    assert gw.resp.last["body"]["input"][0]["content"] == [
        {"type": "input_text", "text": "what is this"}, {"type": "input_image", "image_url": url, "detail": "low"}]
    client.responses.create(model="llama-3", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "and this"}, {"type": "input_image", "image_url": url, "detail": "high"}]}])
    assert gw.chat.last["body"]["messages"][0]["content"] == [
        {"type": "text", "text": "and this"}, {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]


def test_json_schema_output_both_ways(gw):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    client = gw.client()
    gw.resp.script.append(Reply(text='{"a": 1}'))
    out = client.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": "json"}],
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "A", "schema": schema, "strict": True}})
    assert json.loads(out.choices[0].message.content) == {"a": 1}
    assert gw.resp.last["body"]["text"] == {"format": {"type": "json_schema", "name": "A", "schema": schema,
                                                       "strict": True}}
    gw.chat.script.append(Reply(text='{"a": 2}'))
    raw = client.responses.with_raw_response.create(
        model="llama-3", input="json", text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}})
    doc = json.loads(raw.text)
    validate_response(doc)
    assert doc["text"]["format"]["name"] == "A"
    assert gw.chat.last["body"]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "A", "schema": schema, "strict": True}}


def test_max_tokens_cut_off_both_ways(gw):
    client = gw.client()
    gw.resp.script.append(Reply(text="partial", finish="length"))
    out = client.chat.completions.create(model="gpt-5.3-codex", max_completion_tokens=3,
                                         messages=[{"role": "user", "content": "long story"}])
    assert out.choices[0].finish_reason == "length"
    gw.chat.script.append(Reply(text="partial", finish="length"))
    raw = client.responses.with_raw_response.create(model="llama-3", input="long story", max_output_tokens=3)
    doc = json.loads(raw.text)
    validate_response(doc)
    assert doc["status"] == "incomplete"
    assert doc["incomplete_details"] == {"reason": "max_output_tokens"}
    assert doc["output"][0]["status"] == "incomplete"


def test_upstream_errors_keep_status_in_client_shape(gw):
    client = gw.client()
    gw.chat.script.append(Reply(error=(429, {"object": "error", "message": "slow down", "type": "RateLimit", "code": 429})))
    with pytest.raises(openai.RateLimitError) as e:
        client.responses.create(model="llama-3", input="hi")
    assert e.value.status_code == 429
    assert e.value.body["message"] == "slow down"
    gw.resp.script.append(Reply(error=(500, {"error": {"message": "boom", "type": "server_error", "code": None}})))
    with pytest.raises(openai.InternalServerError) as e2:
        client.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": "hi"}])
    assert e2.value.body["message"] == "boom"


def test_refusals_name_the_field(gw):
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-5.3-codex", n=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:  # a backend set to refuse hosted tools
        client.responses.create(model="strict-1", input="hi", tools=[{"type": "web_search"}])
    assert "web_search" in e.value.body["message"] and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="resp-notranslate", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/responses" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="chat-notranslate", input="hi")
    assert "/v1/chat/completions" in e.value.body["message"]
    assert not gw.chat.requests and not gw.resp.requests


def test_hosted_tools_are_dropped_and_reported(gw):
    raw = gw.client().responses.with_raw_response.create(
        model="llama-3", input="hi", tool_choice={"type": "web_search"},
        tools=[{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}])
    assert raw.headers["x-gateway-dropped-tools"] == "web_search,file_search"
    assert raw.parse().output_text
    sent = gw.chat.last["body"]
    assert "tools" not in sent and "tool_choice" not in sent
