"""Anthropic Messages clients on chat-only backends: the request, the buffered answer and the stream,
field by field, against expected values written out here (sans-IO)."""

from __future__ import annotations

import json

import pytest

from extproc.api import api_of
from extproc.config import parse_config
from extproc.errors import BadUpstream, GatewayError
from extproc.exchange.paths import check_request_line
from extproc.routing.classify import Classifier
from extproc.routing.compile import compile_routes, decide
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge
from extproc.translate import req_messages_to_chat, resp_chat_to_messages
from extproc.translate.sse import encode
from extproc.translate.stream_chat_to_messages import ChatToMessagesStream
from extproc.translate.tools import encode_reasoning
from tests.messages_conformance import check_messages_stream, messages_events

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}, "cache_control": {"type": "ephemeral"}}


def chat(body: dict, **kw) -> tuple[dict, list[str]]:
    return req_messages_to_chat.translate_request({"model": "m", "max_tokens": 64, **body}, **kw)


# -- the request ------------------------------------------------------------------------------------

def test_a_full_request_maps_field_by_field():
    body = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Use tools."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBOR"}},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Paris?", "signature": "sig"},
                                              {"type": "redacted_thinking", "data": "opaque"},
                                              {"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}},
                                              {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                                               "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                         {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                                          "content": [{"type": "text", "text": "timeout"}]},
                                         {"type": "text", "text": "And now?"}]},
        ],
        "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 5, "metadata": {"user_id": "u-1"},
        "stream": True, "thinking": {"type": "enabled", "budget_tokens": 8000},
    }
    out, dropped = chat(body, max_tokens_field="max_tokens")
    assert dropped == ["top_k"]
    assert out == {
        "model": "m", "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "user": "u-1", "stop": ["END"],
        "reasoning_effort": "medium",
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
            {"role": "user", "content": "And now?"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                    "parameters": TOOL["input_schema"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "stream": True, "stream_options": {"include_usage": True},
    }


def test_thinking_goes_back_only_where_the_backend_takes_it():
    body = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                           {"type": "text", "text": "a"}]},
                         {"role": "user", "content": "q2"}]}
    assert chat(body)[0]["messages"][1] == {"role": "assistant", "content": "a"}
    assert chat(body, replay_reasoning=True)[0]["messages"][1] == {"role": "assistant", "content": "a",
                                                                    "reasoning_content": "t"}


@pytest.mark.parametrize(("choice", "expected"), [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                                   ({"type": "none"}, "none")])
def test_tool_choice_modes(choice, expected):
    out, _ = chat({"messages": [{"role": "user", "content": "q"}], "tools": [TOOL], "tool_choice": choice})
    assert out["tool_choice"] == expected and "parallel_tool_calls" not in out


@pytest.mark.parametrize(("budget", "effort"), [(1024, "low"), (4096, "medium"), (16384, "high")])
def test_thinking_budget_is_an_effort(budget, effort):
    out, _ = chat({"messages": [{"role": "user", "content": "q"}], "thinking": {"type": "enabled", "budget_tokens": budget}})
    assert out["reasoning_effort"] == effort


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "q"}], "betas": ["x"]}, "betas"),
    ({"messages": [{"role": "user", "content": "q"}], "container": "c"}, "container"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "q"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "r"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source.type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [
                       {"type": "image", "source": {"type": "url", "url": "https://x"}}]}]}]},
     "messages[1].content[0].content[0]"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0].type"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name"),
    ({"messages": [{"role": "user", "content": "q"}], "metadata": {"user_id": "u", "org": "o"}}, "metadata.org"),
    ({"messages": [{"role": "user", "content": "q"}], "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
])
def test_what_cannot_be_mapped_is_refused_naming_the_field(body, param):
    with pytest.raises(GatewayError) as e:
        chat(body)
    assert e.value.status == 400 and e.value.param == param, e.value.message


# -- the buffered answer ----------------------------------------------------------------------------

def completion(message: dict, finish: str = "stop", usage: dict | None = None, **choice) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen3",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
            "usage": usage}


def test_an_answer_with_reasoning_text_and_parallel_calls():
    doc = completion({"content": "Let me check.", "reasoning_content": "two cities",
                      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}},
                                     {"id": "c2", "type": "function", "function": {"name": "w", "arguments": ""}}]},
                     "tool_calls", {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                                    "prompt_tokens_details": {"cached_tokens": 64}})
    out = resp_chat_to_messages.translate_response(doc, "asked", [])
    assert out["id"].startswith("msg_") and out["type"] == "message" and out["role"] == "assistant"
    assert out["model"] == "qwen3"
    assert out["content"] == [{"type": "thinking", "thinking": "two cities", "signature": encode_reasoning("two cities")},
                              {"type": "text", "text": "Let me check."},
                              {"type": "tool_use", "id": "c1", "name": "w", "input": {"city": "Paris"}},
                              {"type": "tool_use", "id": "c2", "name": "w", "input": {}}]
    assert (out["stop_reason"], out["stop_sequence"]) == ("tool_use", None)
    assert out["usage"] == {"input_tokens": 36, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 64,
                            "output_tokens": 20}


@pytest.mark.parametrize(("finish", "extra", "expected"), [
    ("stop", {}, ("end_turn", None)), ("length", {}, ("max_tokens", None)), ("content_filter", {}, ("refusal", None)),
    ("stop", {"stop_reason": "END"}, ("stop_sequence", "END")),  # vLLM names the stop string it met
    ("stop", {"stop_reason": "OTHER"}, ("end_turn", None)), ("stop", {"stop_reason": 128001}, ("end_turn", None)),
])
def test_stop_reasons(finish, extra, expected):
    out = resp_chat_to_messages.translate_response(completion({"content": "x"}, finish, **extra), "m", ["END"])
    assert (out["stop_reason"], out["stop_sequence"]) == expected


def test_a_refusal_is_text_with_stop_reason_refusal():
    out = resp_chat_to_messages.translate_response(completion({"content": None, "refusal": "No."}), "m", [])
    assert out["content"] == [{"type": "text", "text": "No."}] and out["stop_reason"] == "refusal"


@pytest.mark.parametrize(("message", "field"), [
    ({"content": 3}, "choices[0].message.content"),
    ({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
     "choices[0].message.tool_calls[0].function.arguments"),
    ({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]},
     "choices[0].message.tool_calls[0].function.arguments"),
])
def test_an_answer_it_cannot_use_is_a_502_naming_the_field(message, field):
    with pytest.raises(BadUpstream) as e:
        resp_chat_to_messages.translate_response(completion(message), "m", [])
    assert e.value.field == field


# -- the stream -------------------------------------------------------------------------------------

def chunk(delta: dict, finish: str | None = None, **choice) -> bytes:
    return encode(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "qwen3",
                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]}).encode())


USAGE = encode(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "qwen3", "choices": [],
                           "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                                     "prompt_tokens_details": {"cached_tokens": 10}}}).encode())
DONE = b"data: [DONE]\n\n"
# vLLM's way: every call announced, then the arguments interleaved
RECORDED = b"".join([
    chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Two "}), chunk({"reasoning_content": "cities."}),
    chunk({"content": "Checking "}), chunk({"content": "both."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "w", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "w", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}),
    chunk({}, "tool_calls"), USAGE, DONE])


def translate(chunks: list[bytes], stop: list[str] | None = None) -> list[dict]:
    t = ChatToMessagesStream("asked", stop or [])
    return messages_events(b"".join(t.feed(c) for c in chunks) + t.close())


def test_a_recorded_stream_follows_the_grammar_and_carries_everything():
    events = translate([RECORDED])
    msg = check_messages_stream(events)
    assert msg["error"] is None and msg["model"] == "qwen3"
    assert msg["content"] == [{"type": "thinking", "thinking": "Two cities.", "signature": encode_reasoning("Two cities.")},
                              {"type": "text", "text": "Checking both."},
                              {"type": "tool_use", "id": "call_a", "name": "w", "input": {"city": "Paris"}},
                              {"type": "tool_use", "id": "call_b", "name": "w", "input": {"city": "Rome"}}]
    assert msg["stop_reason"] == "tool_use"
    assert msg["usage"] == {"input_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10,
                            "output_tokens": 9}
    # the first call streams as it comes, the held one arrives whole
    args = [e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"]
    assert args == ['{"city":', '"Paris"}', '{"city":"Rome"}']


def test_every_split_point_gives_the_same_stream():
    whole = [{k: v for k, v in e.items() if k != "message"} for e in translate([RECORDED])]
    for cut in range(1, len(RECORDED)):
        got = [{k: v for k, v in e.items() if k != "message"} for e in translate([RECORDED[:cut], RECORDED[cut:]])]
        assert got == whole, cut


def test_a_stop_sequence_in_a_stream():
    events = translate([chunk({"content": "a"}), chunk({}, "stop", stop_reason="END"), DONE], ["END"])
    msg = check_messages_stream(events)
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "END")


@pytest.mark.parametrize(("chunks", "message"), [
    ([chunk({"content": "half"})], "ended before the model finished"),  # cut off: no finish_reason
    ([chunk({"content": "x"}), encode(b'{"error": {"message": "overloaded", "code": "overloaded"}}')], "overloaded"),
    ([chunk({"content": "x"}), b"data: {not json\n\n"], "is not JSON"),
    ([chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "[1"}}]}), chunk({}, "tool_calls"),
      DONE], "is not JSON"),
])
def test_a_broken_stream_ends_with_an_error_event(chunks, message):
    msg = check_messages_stream(translate(chunks))
    assert msg["error"] is not None and message in msg["error"]["message"], msg["error"]


def test_an_upstream_overload_keeps_its_anthropic_type():
    msg = check_messages_stream(translate([encode(b'{"error": {"message": "busy", "code": "overloaded"}}')]))
    assert msg["error"] == {"type": "overloaded_error", "message": "busy"}


def test_a_json_answer_to_a_streamed_request_is_replayed_as_the_stream():
    t = ChatToMessagesStream("m", [])
    doc = completion({"content": "hi", "tool_calls": [{"id": "c1", "type": "function",
                                                       "function": {"name": "f", "arguments": '{"a":1}'}}]}, "tool_calls")
    msg = check_messages_stream(messages_events(t.replay(doc)))
    assert msg["content"] == [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}]
    assert t.response is not None and t.response["usage"] is None  # none reported: the accounting estimates


def test_the_usage_accounting_reads_the_whole_input():
    t = ChatToMessagesStream("m", [])
    t.feed(RECORDED)
    t.close()
    assert t.response is not None
    assert t.response["usage"] == {"input_tokens": 50, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 10}}


# -- the ingress ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/messages/", "/v1/Messages", "/v1/messages;x", "/anthropic/v1/messages"])
def test_other_spellings_of_the_messages_path_are_refused(path):
    with pytest.raises(GatewayError) as e:
        check_request_line("POST", path, has_body=True)
    assert e.value.status == 404


def test_the_messages_path_takes_post_with_a_body():
    check_request_line("POST", "/v1/messages", has_body=True)
    check_request_line("GET", "/v1/chat/completions/chatcmpl-1/messages", has_body=False)  # stored completions
    with pytest.raises(GatewayError) as e:
        check_request_line("POST", "/v1/messages", has_body=False)
    assert e.value.status == 400


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                               (403, "permission_error"), (404, "not_found_error"),
                                               (413, "request_too_large"), (429, "rate_limit_error"),
                                               (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
                                               (529, "overloaded_error")])
def test_errors_for_messages_clients_take_anthropics_shape(status, kind):
    err = GatewayError(status, "nope", code="c", param="p")
    assert json.loads(err.body(api_of("/v1/messages?beta=true"))) == {"type": "error",
                                                                       "error": {"type": kind, "message": "nope"}}
    assert json.loads(err.body(api_of("/v1/chat/completions")))["error"]["message"] == "nope"


# -- classification ---------------------------------------------------------------------------------

_BACKEND = "backends: [{name: b, api: %s, models: ['*'], endpoints: ['127.0.0.1:9']}]"


@pytest.mark.parametrize(("api", "mode", "chat_client_sends"), [
    ("auto", "messages", "messages"),  # a backend nobody described: Claude names answer on Messages
    ("both", "both", "chat"),  # declared to speak both OpenAI APIs: the catalogue does not overrule it
    ("chat", "chat", "chat"),
    ("messages", "messages", "messages"),
])
def test_claude_model_names_in_the_catalogue(api, mode, chat_client_sends):
    res = Classifier(parse_config(_BACKEND % api, env={})).resolve("claude-sonnet-4-5")
    assert res is not None and res.mode == mode
    assert res.upstream_api("chat") == chat_client_sends
    assert res.upstream_api("messages") == ("messages" if mode == "messages" else "chat")


def test_a_system_turn_keeps_its_place_and_context_management_is_dropped_and_named():
    body = {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "system", "content": [{"type": "text", "text": "Now be brief."}]},
                         {"role": "user", "content": "q2"}]}
    out, dropped = chat(body)
    assert dropped == ["context_management"]
    assert out["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                               {"role": "system", "content": "Now be brief."}, {"role": "user", "content": "q2"}]
    with pytest.raises(GatewayError) as e:
        chat({"messages": [{"role": "system", "content": [{"type": "image", "source": {}}]}]})
    assert e.value.param == "messages[0].content[0].type"


@pytest.mark.parametrize(("api", "client_api", "client", "sent"), [
    ("messages", "chat", {"authorization": "Bearer k1"}, [("x-api-key", "k1")]),
    ("chat", "messages", {"x-api-key": "k2"}, [("authorization", "Bearer k2")]),
    ("messages", "messages", {"x-api-key": "k3"}, []),  # its own header, passed on as it is
    ("chat", "chat", {"x-api-key": "k4"}, []),
    ("chat", "messages", {"x-api-key": "k5", "authorization": "Bearer other"}, []),  # the client chose
])
def test_the_clients_key_goes_in_the_header_the_backends_api_reads(api, client_api, client, sent):
    gw = Gateway(parse_config(_BACKEND % api, env={}))
    assert gw.target(gw.config.backends[0], "k").client_credentials(client, client_api) == sent


def test_the_sidecars_key_replaces_the_clients_in_either_header():
    cfg = "backends: [{name: b, api: %s, models: ['*'], endpoints: ['127.0.0.1:9'], api_key_env: K}]"
    for api, header, removed in (("messages", ("x-api-key", "sk"), ("authorization",)),
                                 ("chat", ("authorization", "Bearer sk"), ("x-api-key",))):
        gw = Gateway(parse_config(cfg % api, env={"K": "sk"}))
        target = gw.target(gw.config.backends[0], "k")
        assert header in target.headers() and target.foreign_credentials() == removed
        assert target.client_credentials({"x-api-key": "c", "authorization": "Bearer c"}, "messages") == []


def test_a_stream_without_usage_leaves_the_accounting_to_estimate():
    t = ChatToMessagesStream("m", [])
    msg = check_messages_stream(messages_events(t.feed(chunk({"content": "hi"}) + chunk({}, "stop") + DONE)))
    assert msg["usage"]["output_tokens"] == 0 and t.response is not None and t.response["usage"] is None


def test_a_claude_model_of_an_auto_backend_gets_anthropics_headers():
    cfg = "backends: [{name: b, api: auto, models: ['*'], endpoints: ['127.0.0.1:9'], api_key_env: K}]"
    gw = Gateway(parse_config(cfg, env={"K": "sk"}))
    target = gw.target(gw.config.backends[0], "k")
    assert ("x-api-key", "sk") in target.headers("messages") and ("anthropic-version", "2023-06-01") in target.headers("messages")
    assert ("authorization", "Bearer sk") in target.headers("chat") and target.foreign_credentials("messages") == ("authorization",)


# -- the fast path ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "fast"), [(False, True), (True, False)])
def test_messages_to_a_keyless_messages_backend_are_compiled_into_a_fast_route(key, fast):
    cfg = parse_config("backends: [{name: b, api: messages, models: ['claude-*'], endpoints: ['127.0.0.1:9']"
                       + (", api_key_env: K" if key else "") + "}]", env={"K": "sk"})
    res = Classifier(cfg).resolve("claude-x")
    assert decide(cfg, res, "messages").fast is fast
    assert decide(cfg, res, "chat").fast is False  # translated: the processor
    routes = compile_routes(cfg, Knowledge(), {}).routes.virtual_hosts[0].routes
    fast_routes = [r for r in routes if r.name == "fast:messages:b"]
    assert bool(fast_routes) is fast
    if fast:
        assert fast_routes[0].match.path == "/v1/messages" and not fast_routes[0].match.headers[1:]
