"""Property test of the Chat → Messages request translator (Chat and Responses clients on an `api: messages`
backend), in the style of test_fuzz: a realistic chat request, half the time broken at one place, becomes
a request Anthropic's Messages API takes, or is refused with a 400 naming the field; never another
exception."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import event, given

from extproc.errors import GatewayError
from extproc.translate import req_chat_to_messages
from tests.unit.test_fuzz import broken, chat_request

# Anthropic's Messages request: its top-level fields and the blocks each role may carry.
MESSAGES_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
                   "metadata", "tools", "tool_choice", "thinking", "stream", "output_config", "service_tier"}
BLOCKS = {"user": {"text", "image", "tool_result", "document"},
          "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}


def check_messages_request(out: dict[str, Any]) -> None:
    assert set(out) <= MESSAGES_FIELDS, set(out) - MESSAGES_FIELDS
    assert isinstance(out["max_tokens"], int) and out["max_tokens"] >= 1
    thinking = out.get("thinking")
    if thinking and thinking.get("type") == "enabled":
        assert 1024 <= thinking["budget_tokens"] < out["max_tokens"]
    uses: set[str] = set()
    for i, m in enumerate(out["messages"]):
        assert m["role"] in BLOCKS and (i == 0 or m["role"] != out["messages"][i - 1]["role"]), out["messages"]
        blocks = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        assert blocks, m
        for b in blocks:
            assert b["type"] in BLOCKS[m["role"]], b
            if b["type"] == "tool_use":
                assert isinstance(b["input"], dict) and b["id"]
                uses.add(b["id"])
            if b["type"] == "tool_result":  # answers a call of the assistant turn before
                assert b["tool_use_id"] in uses, (b, uses)
    orjson.dumps(out)


def _for_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments as models write them, JSON objects (Anthropic's tool input is one; other text is
    refused, docs/translation.md), and no `json_object` format (refused: Anthropic has only schemas)."""
    body.pop("response_format", None)
    for m in body["messages"]:
        for c in m.get("tool_calls") or ():
            c["function"]["arguments"] = json.dumps({"q": c["function"]["arguments"]})
    return body


@given(chat_request().map(_for_anthropic).flatmap(broken))
def test_a_chat_request_broken_anywhere_is_translated_for_messages_or_refused_naming_the_field(case):
    body, was_broken = case
    try:
        out = req_chat_to_messages.translate_request(body)
    except GatewayError as e:
        event(f"refused: {e.param} {'broken' if was_broken else 'valid'}")
        assert e.status == 400 and e.param, e.message
        return
    except KeyError as e:  # `model` itself removed: the request side refuses it before any translator runs
        assert was_broken and e.args == ("model",)
        return
    event("translated")
    check_messages_request(out)
