"""End to end: streamed translation both ways with the openai SDK's streaming helpers."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from extproc.translate.sse import SSEDecoder

from .conformance import check_stream
from .upstreams import Reply

TOOLS_R = [{"type": "function", "name": "get_weather", "description": "Weather", "strict": False,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TOOLS_C = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["parameters"]}} for t in TOOLS_R]


def clean(x: object) -> object:
    """Without the ids minted per request, the SDK's client-side `parsed` fields and unset (None) fields."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if k not in ("id", "call_id", "parsed") and v is not None}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def strip(response: dict) -> object:
    return clean([response["output"], response["usage"], response["status"]])


def stream_events(client: openai.OpenAI, **kw) -> list[dict]:
    with client.responses.create(stream=True, **kw) as s:
        return [e.model_dump(mode="json", exclude_unset=True) for e in s]


@pytest.mark.parametrize("reply", [
    Reply(text="streamed hello"),
    Reply(text="after thought", reasoning="let me think"),
    Reply(text=None, reasoning="need tools", calls=[("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Rome"}')]),
    Reply(text="cut short", finish="length"),
], ids=["text", "reasoning-then-text", "reasoning-then-parallel-tools", "length"])
def test_responses_stream_from_chat_backend(gw, reply):
    client = gw.client()
    gw.chat.script.append(reply)
    with client.responses.stream(model="llama-3", input="go", tools=TOOLS_R) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        # the SDK helper only hands out a final response for response.completed
        final = s.get_final_response().model_dump(mode="json") if reply.finish == "stop" else None
    assert gw.chat.last["body"]["stream_options"] == {"include_usage": True}
    assert "".join(deltas) == (reply.text or "")
    gw.chat.script.append(reply)
    last = check_stream(stream_events(client, model="llama-3", input="go", tools=TOOLS_R))
    gw.chat.script.append(reply)
    plain = client.responses.create(model="llama-3", input="go", tools=TOOLS_R).model_dump(mode="json")
    assert strip(plain) == strip(last)
    if final is not None:
        assert strip(final) == strip(plain)
    if reply.finish == "length":
        assert last["status"] == "incomplete" and last["incomplete_details"] == {"reason": "max_output_tokens"}
    if reply.calls:
        assert [o["type"] for o in last["output"]] == ["reasoning", "function_call", "function_call"]
        assert [json.loads(o["arguments"])["city"] for o in last["output"][1:]] == ["Paris", "Rome"]


def raw_events(gw, path: str, body: dict) -> list[dict]:
    """The SSE events as sent, read without the SDK (which raises on `error` events)."""
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    decoder = SSEDecoder()
    events = decoder.feed(resp.read()) + decoder.close()
    conn.close()
    return [json.loads(e.data) for e in events if e.data != "[DONE]"]


def test_responses_stream_upstream_cut_gives_error_and_failed(gw):
    gw.chat.script.append(Reply(text="half a sent", cut=True))
    with pytest.raises(openai.APIError, match="ended before the model finished"):
        stream_events(gw.client(), model="llama-3", input="go")
    gw.chat.script.append(Reply(text="half a sent", cut=True))
    events = raw_events(gw, "/v1/responses", {"model": "llama-3", "input": "go", "stream": True})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    final = check_stream(events)
    assert final["status"] == "failed" and final["error"]["code"] == "upstream_incomplete"


def test_responses_stream_upstream_error_status(gw):
    gw.chat.script.append(Reply(error=(400, {"object": "error", "message": "context too long", "code": 400})))
    with pytest.raises(openai.BadRequestError) as e:
        stream_events(gw.client(), model="llama-3", input="go")
    assert "context too long" in e.value.body["message"]


@pytest.mark.parametrize("reply", [
    Reply(text="chat hello"),
    Reply(text="answer", reasoning="pondering"),
    Reply(text=None, calls=[("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Rome"}'),
                            ("get_weather", '{"city":"Lima"}')]),
    Reply(text="trunc", finish="length"),
], ids=["text", "reasoning", "parallel-tools", "length"])
def test_chat_stream_from_responses_model(gw, reply):
    client = gw.client()
    gw.resp.script.append(reply)
    with client.chat.completions.stream(model="gpt-5.3-codex", messages=[{"role": "user", "content": "go"}],
                                        tools=TOOLS_C, stream_options={"include_usage": True}) as s:
        chunks = list(s)
        try:
            final = s.get_final_completion()
        except openai.LengthFinishReasonError as e:  # the SDK's own verdict on a cut-off turn
            assert reply.finish == "length"
            final = e.completion
    choice = final.choices[0]
    assert choice.message.content == reply.text
    if reply.calls:
        assert choice.finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == ["Paris", "Rome", "Lima"]
        assert len({c.id for c in choice.message.tool_calls}) == 3
    else:
        assert choice.finish_reason == ("length" if reply.finish == "length" else "stop")
    assert final.usage.total_tokens == 18
    raw = [c.chunk for c in chunks if c.type == "chunk"]
    assert raw[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in raw}) == 1
    if reply.reasoning:
        assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in raw if c.choices) == reply.reasoning


def test_chat_stream_without_usage_request_has_no_usage_chunk(gw):
    stream = gw.client().chat.completions.create(model="gpt-5.3-codex", stream=True,
                                                 messages=[{"role": "user", "content": "go"}])
    chunks = list(stream)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_upstream_cut_raises(gw):
    gw.resp.script.append(Reply(text="half", cut=True))
    with pytest.raises(openai.APIError):
        list(gw.client().chat.completions.create(model="gpt-5.3-codex", stream=True,
                                                 messages=[{"role": "user", "content": "go"}]))


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
def test_gzip_from_upstream_is_decoded(gw, stream):
    client = gw.client()
    gw.chat.script.append(Reply(text="squeezed ünïcode", gzip=True))
    gw.resp.script.append(Reply(text="squeezed too", gzip=True))
    if stream:
        with client.responses.stream(model="llama-3", input="go") as s:
            assert s.get_final_response().output_text == "squeezed ünïcode"
        out = client.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": "x"}],
                                             stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in out if c.choices) == "squeezed too"
    else:
        assert client.responses.create(model="llama-3", input="go").output_text == "squeezed ünïcode"
        assert client.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": "x"}]
                                              ).choices[0].message.content == "squeezed too"
    assert gw.chat.requests[0]["headers"]["accept-encoding"] == "identity"


@pytest.mark.parametrize("reply", [
    Reply(text=None, reasoning="plan", calls=[("get_weather", '{"city":"Oslo"}')]),
    Reply(text="half", cut=True),
], ids=["reasoning-then-tool", "cut-mid-stream"])
def test_chat_stream_edge_cases(gw, reply):
    client = gw.client()
    gw.resp.script.append(reply)
    if reply.cut:
        with pytest.raises(openai.APIError), client.chat.completions.stream(
                model="gpt-5.3-codex", messages=[{"role": "user", "content": "go"}]) as s:
            list(s)
        return
    with client.chat.completions.stream(model="gpt-5.3-codex", messages=[{"role": "user", "content": "go"}],
                                        tools=TOOLS_C) as s:
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "plan"
    assert msg.tool_calls[0].function.arguments == '{"city":"Oslo"}' and msg.tool_calls[0].index == 0
