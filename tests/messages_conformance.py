"""Anthropic's Messages stream grammar, checked strictly and independently of the code under test.

Written from Anthropic's streaming documentation: `message_start` first; blocks one at a time with
indexes 0, 1, 2...; each block's deltas of its own kind only; a thinking block's `signature_delta`
once, after its thinking and before its stop; `message_delta` once, after every block stopped;
`message_stop` last. `ping` may come anywhere in between; an `error` event ends the stream.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.translate.sse import SSEDecoder

STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"}
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "request_too_large", "rate_limit_error", "timeout_error", "api_error", "overloaded_error"}
_DELTAS = {"text": {"text_delta": "text"}, "thinking": {"thinking_delta": "thinking", "signature_delta": "signature"},
           "tool_use": {"input_json_delta": "partial_json"}, "redacted_thinking": {}}
_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def messages_events(raw: bytes) -> list[dict[str, Any]]:
    """The events of a Messages stream; each `event:` name must equal its data's `type`."""
    dec = SSEDecoder()
    events = dec.feed(raw) + dec.close()
    out = []
    for ev in events:
        doc = json.loads(ev.data)
        assert ev.event == doc["type"], (ev.event, doc)
        out.append(doc)
    return out


def _usage(u: Any) -> None:
    assert isinstance(u, dict), u
    for key in _USAGE_KEYS:
        if key in u and u[key] is not None:
            assert isinstance(u[key], int) and not isinstance(u[key], bool) and u[key] >= 0, (key, u)


def check_messages_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The Message the stream accumulates to (as the SDKs build it); `error` set when it ended in one.
    AssertionError at the first event that breaks a rule."""
    assert events and events[0]["type"] == "message_start", events[:1]
    message = events[0]["message"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["content"] == []
    assert isinstance(message["id"], str) and isinstance(message["model"], str)
    assert message["stop_reason"] is None and message["stop_sequence"] is None
    _usage(message["usage"])
    content: list[dict[str, Any]] = []
    result = {**message, "content": content, "error": None}
    open_block: dict[str, Any] | None = None
    partial = ""
    signed = False
    delta_seen = False
    for i, ev in enumerate(events[1:], 1):
        kind = ev["type"]
        assert not (result["error"] or result.get("stopped")), f"event {i} after the end: {ev}"
        if kind == "ping":
            continue
        if kind == "error":
            err = ev["error"]
            assert err["type"] in ERROR_TYPES and isinstance(err["message"], str), ev
            result["error"] = err
            continue
        assert not delta_seen or kind == "message_stop", f"event {i} after message_delta: {ev}"
        if kind == "content_block_start":
            assert open_block is None, f"block {ev['index']} starts while block {len(content) - 1} is open"
            assert ev["index"] == len(content), ev
            block = dict(ev["content_block"])
            btype = block["type"]
            assert btype in _DELTAS, ev
            if btype == "text":
                assert block["text"] == ""
            elif btype == "thinking":
                assert block["thinking"] == "" and block.get("signature", "") == ""
            elif btype == "tool_use":
                assert isinstance(block["id"], str) and block["id"] and isinstance(block["name"], str)
                assert block["input"] == {} and set(block) == {"type", "id", "name", "input"}, block
            content.append(block)
            open_block, partial, signed = block, "", False
        elif kind == "content_block_delta":
            assert open_block is not None and ev["index"] == len(content) - 1, f"delta outside its block: {ev}"
            delta = ev["delta"]
            allowed = _DELTAS[open_block["type"]]
            assert delta["type"] in allowed, f"{delta['type']} in a {open_block['type']} block"
            value = delta[allowed[delta["type"]]]
            assert isinstance(value, str), ev
            if delta["type"] == "input_json_delta":
                partial += value
            elif delta["type"] == "signature_delta":
                assert not signed, "a second signature_delta"
                signed = True
                open_block["signature"] = value
            else:
                assert not signed, "thinking after its signature"
                key = allowed[delta["type"]]
                open_block[key] = open_block.get(key, "") + value
        elif kind == "content_block_stop":
            assert open_block is not None and ev["index"] == len(content) - 1, f"stop of a block not open: {ev}"
            if open_block["type"] == "thinking":
                assert signed and open_block["signature"], "a thinking block ends without its signature"
            if open_block["type"] == "tool_use":
                open_block["input"] = json.loads(partial) if partial else {}
                assert isinstance(open_block["input"], dict), "tool input is not a JSON object"
            open_block = None
        elif kind == "message_delta":
            assert open_block is None, "message_delta while a block is open"
            assert ev["delta"]["stop_reason"] in STOP_REASONS, ev
            sequence = ev["delta"].get("stop_sequence")
            assert (sequence is not None) == (ev["delta"]["stop_reason"] == "stop_sequence"), ev
            _usage(ev["usage"])
            assert isinstance(ev["usage"]["output_tokens"], int)
            result["stop_reason"], result["stop_sequence"] = ev["delta"]["stop_reason"], sequence
            result["usage"] = {**result["usage"], **{k: v for k, v in ev["usage"].items() if v is not None}}
            delta_seen = True
        elif kind == "message_stop":
            assert delta_seen, "message_stop before message_delta"
            result["stopped"] = True
        else:
            raise AssertionError(f"unknown event type {kind!r}")
    assert result["error"] or result.get("stopped"), "the stream ends without message_stop or error"
    result.pop("stopped", None)
    return result
