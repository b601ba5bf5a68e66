"""A Chat Completions request, rewritten for a backend that only serves Anthropic's /v1/messages.

System and developer messages become `system`; `tool` messages `tool_result` blocks of a user turn;
assistant tool calls `tool_use` blocks. Consecutive messages of one role make one turn, as the
Messages API wants turns to alternate. Reasoning handed back as text is left out: Anthropic takes
thinking back only with the signature it made, which chat clients do not keep.

Responses clients reach Messages backends through this too (their request is first written as a
chat request, `req_responses_to_chat`), so it accepts every field that translation writes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from extproc.errors import invalid, unsupported
from extproc.translate.common import NUMBER, expect, is_default, text_of

DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens; chat clients may leave it out
# reasoning_effort -> thinking.budget_tokens (Anthropic's minimum budget is 1024)
BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
# Accepted and not forwarded: how OpenAI stores, bills or presents an answer, which has no Messages field.
_LOCAL = ("store", "metadata", "service_tier", "prompt_cache_key", "stream_options", "verbosity", "logprobs",
          "top_logprobs", "modalities", "n")
_REFUSED = {
    "seed": "the Messages API has no seed",
    "logit_bias": "the Messages API has no logit_bias",
    "frequency_penalty": "the Messages API has no frequency_penalty",
    "presence_penalty": "the Messages API has no presence_penalty",
    "audio": "audio output is not available on the Messages API",
    "prediction": "predicted outputs are not available on the Messages API",
    "web_search_options": "web search runs as Anthropic's server tool, which this gateway does not send",
    "functions": "use 'tools' instead of the deprecated 'functions'",
    "function_call": "use 'tool_choice' instead of the deprecated 'function_call'",
}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
          "user", "safety_identifier", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort",
          "response_format", *_LOCAL, *_REFUSED}
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.S)


def translate_request(body: dict[str, Any], thinking: list[list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """`thinking`: Anthropic's signed thinking blocks to hand back, per assistant turn in order (a
    Responses client's, from the reasoning items the sidecar sealed them in)."""
    for key in body:
        if key not in _KNOWN:
            raise unsupported(key, "messages", "unknown Chat Completions field")
    for key, why in _REFUSED.items():
        if not is_default(body.get(key)):
            raise unsupported(key, "messages", why)
    n = expect(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise unsupported("n", "messages", "the Messages API returns one answer per request")
    if expect(body, "logprobs", bool, "a boolean"):
        raise unsupported("logprobs", "messages", "the Messages API has no logprobs")
    system, turns = _turns(body.get("messages"))
    assistant = [t for t in turns if t["role"] == "assistant"]
    for turn, blocks in zip(assistant, thinking or (), strict=False):
        turn["content"][:0] = blocks
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = expect(body, key, int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise invalid(key, "expected a positive integer")
    out: dict[str, Any] = {"model": body["model"], "messages": turns, "max_tokens": max_tokens or DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = system
    for name in ("temperature", "top_p"):
        if (value := expect(body, name, NUMBER, "a number")) is not None:
            out[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = stop
    elif stop is not None:
        raise invalid("stop", "expected a string or a list of strings")
    user = expect(body, "user", str, "a string") or expect(body, "safety_identifier", str, "a string")
    if user:
        out["metadata"] = {"user_id": user}
    effort = expect(body, "reasoning_effort", str, "a string")
    if effort is not None and effort not in (*BUDGETS, "none"):
        raise invalid("reasoning_effort", f"expected one of {', '.join(BUDGETS)}")
    fmt = expect(body, "response_format", dict, "an object")
    if fmt is not None and fmt.get("type") != "text":
        out["output_config"] = {"format": _format(fmt)}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = _choice(body.get("tool_choice"))
        if expect(body, "parallel_tool_calls", bool, "a boolean") is False:
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    if effort in BUDGETS and _may_think(out):
        out["thinking"] = {"type": "enabled", "budget_tokens": BUDGETS[effort]}
        out["max_tokens"] += BUDGETS[effort]  # thinking counts toward max_tokens, and must stay below it
    if expect(body, "stream", bool, "a boolean"):
        out["stream"] = True
    return out


def _may_think(out: dict[str, Any]) -> bool:
    """Whether Anthropic takes thinking for this request. It refuses it with a forced tool choice, and in
    a tool loop whose assistant turn does not start with a thinking block: a chat client keeps no signed
    thinking to hand back, so such a request goes without (Anthropic's own advice), and the next turn
    thinks again."""
    if out.get("tool_choice", {}).get("type") in ("any", "tool"):
        return False
    messages = out["messages"]
    last = messages[-1]
    if not (last["role"] == "user" and any(b["type"] == "tool_result" for b in last["content"])):
        return True
    turn = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    return turn is not None and turn["content"][0]["type"] in ("thinking", "redacted_thinking")


def _format(fmt: dict[str, Any]) -> dict[str, Any]:
    js = fmt.get("json_schema")
    if fmt.get("type") == "json_schema" and isinstance(js, dict) and isinstance(js.get("schema"), dict):
        return {"type": "json_schema", "schema": js["schema"]}
    raise unsupported("response_format", "messages", "only a json_schema format has a Messages equivalent")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools", "expected a list")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise unsupported(f"tools[{i}]", "messages", "only function tools can be translated")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"tools[{i}].function.name", "expected a non-empty string")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise invalid(f"tools[{i}].function.parameters", "expected a JSON schema object")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"tools[{i}].function.description", "expected a string")
        out.append({"name": name, "input_schema": params, **({"description": description} if description else {})})
    return out


def _choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise unsupported("tool_choice", "messages", "expected 'auto', 'none', 'required' or one function")


def _turns(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    calls: set[str] = set()

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        elif blocks:
            turns.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected a message object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(text_of(m.get("content"), f"{where}.content", ("text",)))
        elif role == "user":
            add("user", _user_blocks(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            add("assistant", _assistant_blocks(m, where, calls))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise invalid(f"{where}.tool_call_id", f"no tool call with id {call_id!r} precedes this message")
            add("user", [{"type": "tool_result", "tool_use_id": call_id,
                          "content": text_of(m.get("content"), f"{where}.content", ("text",))}])
        else:
            raise invalid(f"{where}.role", f"unknown role {role!r}")
    if not turns:
        raise invalid("messages", "expected at least one user or assistant message")
    return "\n\n".join(s for s in system if s), turns


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid(where, "expected a string or a list of content parts")
    out: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance(part, dict):
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise invalid(f"{where}[{i}].image_url.url", "expected a string")
            data = _DATA_URL.fullmatch(url)
            source = {"type": "base64", "media_type": data[1], "data": data[2]} if data else {"type": "url", "url": url}
            out.append({"type": "image", "source": source})
        else:
            raise unsupported(f"{where}[{i}]", "messages", f"content part type {kind!r} cannot be translated")
    return out


def _assistant_blocks(m: dict[str, Any], where: str, calls: set[str]) -> list[dict[str, Any]]:
    content = m.get("content")
    text = text_of(content, f"{where}.content", ("text", "refusal")) if content is not None else ""
    refusal = m.get("refusal")
    out: list[dict[str, Any]] = [{"type": "text", "text": text + (refusal if isinstance(refusal, str) else "")}]
    if not out[0]["text"]:
        out = []
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise invalid(f"{where}.tool_calls", "expected a list")
    for j, call in enumerate(tool_calls):
        cw = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise invalid(cw, "expected a function tool call with an id and a name")
        arguments = fn.get("arguments") or "{}"
        try:
            tool_input = orjson.loads(arguments) if isinstance(arguments, str) else None
        except orjson.JSONDecodeError:
            tool_input = None
        if not isinstance(tool_input, dict):
            raise invalid(f"{cw}.function.arguments", "expected a JSON object (the Messages API takes tool input as one)")
        calls.add(call["id"])
        out.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": tool_input})
    return out
