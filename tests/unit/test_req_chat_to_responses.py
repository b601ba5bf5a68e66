"""Chat Completions request -> Responses request, field by field (sans-IO)."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.translate.req_chat_to_responses import translate_request


def tr(**body):
    return translate_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})


def test_minimal():
    assert tr() == {"model": "m", "input": [{"type": "message", "role": "user", "content": "hi"}]}


def test_messages_become_items_in_order():
    out = translate_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                     {"type": "file", "file": {"file_id": "file-1", "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
    ]})
    assert out["input"] == [
        {"type": "message", "role": "system", "content": "be brief"},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"},
            {"type": "input_file", "file_id": "file-1", "filename": "a.pdf"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": "two"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done", "annotations": []}]},
    ]


def test_assistant_with_only_tool_calls_has_no_empty_message():
    out = translate_request({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}]})
    assert [i["type"] for i in out["input"]] == ["message", "function_call"]


@pytest.mark.parametrize(("body", "expected"), [
    ({"max_tokens": 10}, {"max_output_tokens": 10}),
    ({"max_completion_tokens": 20, "max_tokens": 10}, {"max_output_tokens": 20}),
    ({"reasoning_effort": "high"}, {"reasoning": {"effort": "high"}}),
    ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
    ({"user": "u", "metadata": {"k": "v"}, "store": False}, {"user": "u", "metadata": {"k": "v"}, "store": False}),
    ({"prompt_cache_key": "p", "safety_identifier": "s", "service_tier": "flex"},
     {"prompt_cache_key": "p", "safety_identifier": "s", "service_tier": "flex"}),
    ({"parallel_tool_calls": False}, {"parallel_tool_calls": False}),
    ({"stream": True}, {"stream": True}),
    ({"response_format": {"type": "json_object"}}, {"text": {"format": {"type": "json_object"}}}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}},
     {"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}}}),
    ({"verbosity": "low"}, {"text": {"verbosity": "low"}}),
    ({"logprobs": True, "top_logprobs": 3}, {"include": ["message.output_text.logprobs"], "top_logprobs": 3}),
    ({"tool_choice": "required"}, {"tool_choice": "required"}),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, {"tool_choice": {"type": "function", "name": "f"}}),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"},
                                                  "strict": True}}]},
     {"tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}]}),
    ({"n": 1, "seed": None, "stop": None, "stream_options": {"include_usage": True}}, {}),
])
def test_fields(body, expected):
    out = tr(**body)
    del out["model"], out["input"]
    assert out == expected


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"stop": ["x"]}, "stop"),
    ({"seed": 3}, "seed"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(GatewayError) as e:
        tr(**body)
    assert e.value.status == 400
    assert e.value.param == param


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"tools": [{"type": "function"}]}, "tools[0].function.name"),
    ({"tool_choice": 3}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"reasoning_effort": 2}, "reasoning_effort"),
])
def test_invalid_input(body, param):
    with pytest.raises(GatewayError) as e:
        tr(**body)
    assert (e.value.status, e.value.param) == (400, param)
