"""The typed upstream models: a wrong type names its JSON path, unknown fields pass, null is absent."""

from __future__ import annotations

import json

import pytest

from extproc.errors import BadUpstream
from extproc.translate import wire


@pytest.mark.parametrize(("doc", "field", "problem"), [
    ({"choices": [{"index": 0, "delta": {"content": 5}}]}, "choices[0].delta.content", "is an integer, expected a string"),
    ({"choices": [{"delta": {"tool_calls": [{"index": -1}]}}]}, "choices[0].delta.tool_calls[0].index",
     "is negative, expected a non-negative integer"),
    ({"usage": {"prompt_tokens": True}}, "usage.prompt_tokens", "is a boolean, expected an integer"),
    ({"choices": "x"}, "choices", "is a string, expected a list"),
    ([1], "stream event", "is a list, expected an object"),
])
def test_a_wrong_type_names_its_json_path(doc, field, problem):
    with pytest.raises(BadUpstream) as e:
        wire.decode(json.dumps(doc), wire.ChatChunk, "stream event")
    assert (e.value.status, e.value.code, e.value.field) == (502, "bad_upstream_response", field)
    assert e.value.message == f"the upstream's answer cannot be translated: '{field}' {problem}"


def test_a_missing_required_field_and_text_that_is_not_json():
    with pytest.raises(BadUpstream) as e:
        wire.convert({"output": [{"type": "message", "content": [{"type": "output_text", "logprobs": [{}]}]}]},
                     wire.ResponseObject, "body")
    assert e.value.field == "output[0].content[0].logprobs[0].token" and "is missing" in e.value.message
    with pytest.raises(BadUpstream) as e:
        wire.decode("{oops", wire.ChatChunk, "stream event")
    assert e.value.field == "stream event" and e.value.message.endswith("is not JSON")


def test_unknown_fields_pass_and_null_is_absent():
    chunk = wire.decode(json.dumps({"id": "c", "x_vendor": {"any": [1, "thing"]}, "model": None, "choices": [
        {"index": 0, "delta": {"content": "hi", "audio": 3}, "finish_reason": None, "extra": True}]}),
        wire.ChatChunk, "stream event")
    assert chunk.model is None and chunk.choices is not None
    assert chunk.choices[0].delta is not None and chunk.choices[0].delta.content == "hi"


def test_dict_readers_share_the_models_and_name_the_whole_path():
    from extproc.translate.common import usage_chat_to_responses, usage_responses_to_chat
    from extproc.translate.resp_chat_to_responses import chat_reasoning, message_text
    from extproc.translate.resp_responses_to_chat import reasoning_text

    assert usage_chat_to_responses({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == {
        "input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}
    assert usage_responses_to_chat({}) is None
    with pytest.raises(BadUpstream) as e:
        usage_responses_to_chat({"usage": {"input_tokens_details": {"cached_tokens": "9"}}}, "response")
    assert e.value.field == "response.usage.input_tokens_details.cached_tokens"
    assert message_text({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, "m") == "ab"
    assert chat_reasoning({"reasoning_content": "", "reasoning": "why"}, "m") == "why"
    assert reasoning_text({"summary": [], "content": [{"type": "reasoning_text", "text": "raw"}]}, "output[0]") == "raw"
    with pytest.raises(BadUpstream) as e:
        message_text({"content": [{"text": 1}]}, "choices[0].message")
    assert e.value.field == "choices[0].message.content[0].text"
