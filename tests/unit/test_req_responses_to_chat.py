"""Responses request -> Chat Completions request, field by field (sans-IO)."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.state.records import input_items
from extproc.translate.req_responses_to_chat import translate_request


def tr(**body):
    return translate_request({"model": "m", "input": "hi", **body})


def test_string_input():
    assert tr() == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_items_become_messages():
    out = translate_request({"model": "m", "instructions": "be brief", "input": [
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "https://x/y.png"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "thinking", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "secret"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}", "status": "completed"},
        {"type": "function_call", "id": "fc_2", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "r2"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "and?"}]},
    ]})
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "dev rules"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "auto"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "thinking", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "user", "content": "and?"},
    ]


def test_reasoning_is_never_replayed_as_text():
    out = tr(input=[{"type": "reasoning", "summary": [{"type": "summary_text", "text": "hidden"}]},
                    {"role": "user", "content": "q"}])
    assert "hidden" not in str(out)


@pytest.mark.parametrize(("body", "expected"), [
    ({"max_output_tokens": 9}, {"max_completion_tokens": 9}),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, {"reasoning_effort": "low"}),
    ({"temperature": 0.1, "top_p": 0.5, "user": "u", "metadata": {"a": "b"}},
     {"temperature": 0.1, "top_p": 0.5, "user": "u", "metadata": {"a": "b"}}),
    ({"prompt_cache_key": "k", "safety_identifier": "s", "service_tier": "auto", "parallel_tool_calls": True},
     {"prompt_cache_key": "k", "safety_identifier": "s", "service_tier": "auto"}),  # no tools: chat APIs refuse it
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}]},
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]}),
    ({"tool_choice": {"type": "function", "name": "f"}, "tools": [{"type": "function", "name": "f"}]},
     {"tool_choice": {"type": "function", "function": {"name": "f"}}, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ({"tool_choice": "none"}, {}),  # without tools, chat APIs refuse tool_choice
    ({"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}}),
    ({"text": {"format": {"type": "json_object"}, "verbosity": "high"}},
     {"response_format": {"type": "json_object"}, "verbosity": "high"}),
    ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 2}),
    ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}),
    ({"store": False, "include": ["reasoning.encrypted_content"], "truncation": "auto"}, {}),
])
def test_fields(body, expected):
    out = tr(**body)
    del out["model"], out["messages"]
    assert out == expected


def test_max_tokens_field_per_backend():
    assert tr(max_output_tokens=5, )["max_completion_tokens"] == 5
    assert translate_request({"model": "m", "input": "x", "max_output_tokens": 5},
                             max_tokens_field="max_tokens")["max_tokens"] == 5


def test_stored_turns_replay_as_chat_history():
    """What the sidecar merges into `input` for previous_response_id: earlier inputs and outputs."""
    prior = [*input_items("a"), {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]}, {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}", "status": "completed"}]
    out = translate_request({"model": "m", "instructions": "sys", "input": [*prior, *input_items([
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}])]})
    assert out["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "p"}}, "prompt"),
    ({"max_tool_calls": 3}, "max_tool_calls"),
    ({"nonsense": 1}, "nonsense"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0].file_id"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(GatewayError) as e:
        tr(**body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_parameter")


@pytest.mark.parametrize(("body", "param"), [
    ({"input": 5}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "mystery"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"instructions": 4}, "instructions"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": True}, "max_output_tokens"),
    ({"reasoning": "high"}, "reasoning"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format.name"),
    ({"stream": 1}, "stream"),
])
def test_invalid_input(body, param):
    with pytest.raises(GatewayError) as e:
        tr(**body)
    assert (e.value.status, e.value.param) == (400, param)


def test_an_allowed_tool_without_a_name_is_the_clients_error():
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "f"}, {"type": "function"}]}
    with pytest.raises(GatewayError) as e:
        tr(tools=tools, tool_choice=choice)
    assert (e.value.status, e.value.param, e.value.code) == (400, "tool_choice.tools[1].name", "invalid_value")
