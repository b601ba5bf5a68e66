"""A Chat Completions request, rewritten for a model that only answers on /v1/responses."""

from __future__ import annotations

from typing import Any

from extproc.errors import invalid, unsupported
from extproc.translate.common import expect, is_default, text_of

# Same name and meaning on both APIs.
_COPIED = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "store",
           "prompt_cache_key", "safety_identifier", "service_tier", "stream")
# Chat fields with no Responses equivalent: refused unless they ask for nothing.
_REFUSED = {
    "stop": "the Responses API has no stop sequences",
    "seed": "the Responses API has no seed",
    "logit_bias": "the Responses API has no logit_bias",
    "frequency_penalty": "the Responses API has no frequency_penalty",
    "presence_penalty": "the Responses API has no presence_penalty",
    "audio": "audio output is not available on the Responses API",
    "prediction": "predicted outputs are not available on the Responses API",
    "web_search_options": "send a web_search tool to the Responses model instead",
    "functions": "use 'tools' instead of the deprecated 'functions'",
    "function_call": "use 'tool_choice' instead of the deprecated 'function_call'",
}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "reasoning_effort", "tools",
          "tool_choice", "response_format", "verbosity", "n", "stream_options", "logprobs",
          "top_logprobs", "modalities", *_COPIED, *_REFUSED}


def translate_request(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": body["model"]}
    for key in body:
        if key not in _KNOWN:
            raise unsupported(key, "responses", "unknown Chat Completions field")
    for key, why in _REFUSED.items():
        if not is_default(body.get(key)):
            raise unsupported(key, "responses", why)
    n = expect(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise unsupported("n", "responses", "the Responses API returns one choice per request")
    modalities = expect(body, "modalities", list, "a list")
    if modalities and any(m != "text" for m in modalities):
        raise unsupported("modalities", "responses", "only text output can be translated")
    for key in _COPIED:
        if body.get(key) is not None:
            out[key] = body[key]
    if out.get("stream") is not None and not isinstance(out["stream"], bool):
        raise invalid("stream", "expected a boolean")
    out["input"] = _input(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise invalid("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                          "expected a positive integer")
        out["max_output_tokens"] = max_tokens
    effort = expect(body, "reasoning_effort", str, "a string")
    if effort is not None:
        out["reasoning"] = {"effort": effort}
    if body.get("tools") is not None:
        out["tools"] = [_tool(t, i) for i, t in enumerate(expect(body, "tools", list, "a list"))]
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    text: dict[str, Any] = {}
    if body.get("response_format") is not None:
        text["format"] = _format(body["response_format"])
    if body.get("verbosity") is not None:
        text["verbosity"] = body["verbosity"]
    if text:
        out["text"] = text
    if body.get("logprobs"):
        out["include"] = ["message.output_text.logprobs"]
        if body.get("top_logprobs") is not None:
            out["top_logprobs"] = expect(body, "top_logprobs", int, "an integer")
    return out


def _input(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of messages")
    items: list[dict[str, Any]] = []
    calls_made: set[str] = set()
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(field, "expected a message object")
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer", "user"):
            items.append({"type": "message", "role": role, "content": _user_parts(content, f"{field}.content")})
        elif role == "assistant":
            text = text_of(content, f"{field}.content", ("text", "refusal"))
            if text:
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": text, "annotations": []}]})
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise invalid(f"{field}.tool_calls", "expected a list")
            for j, call in enumerate(calls):
                items.append(_call_item(call, f"{field}.tool_calls[{j}]"))
                calls_made.add(items[-1]["call_id"])
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{field}.tool_call_id", "a tool message needs the id of the call it answers")
            if call_id not in calls_made:
                raise invalid(f"{field}.tool_call_id", f"no assistant tool call with id {call_id!r} precedes this message")
            items.append({"type": "function_call_output", "call_id": call_id,
                          "output": text_of(content, f"{field}.content", ("text",))})
        elif role == "function":
            raise unsupported(f"{field}.role", "responses", "use 'tool' messages instead of 'function'")
        else:
            raise invalid(f"{field}.role", f"unknown role {role!r}")
    return items


def _user_parts(content: Any, field: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(field, "expected a string or a non-empty list of content parts")
    parts = []
    for i, p in enumerate(content):
        f = f"{field}[{i}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise invalid(f"{f}.text", "expected a string")
            parts.append({"type": "input_text", "text": p["text"]})
        elif kind == "image_url":
            img = p.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            if not isinstance(url, str):
                raise invalid(f"{f}.image_url.url", "expected a string")
            detail = img.get("detail") if isinstance(img, dict) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        elif kind == "file":
            src = p.get("file")
            if not isinstance(src, dict):
                raise invalid(f"{f}.file", "expected an object")
            part = {"type": "input_file"}
            for k in ("file_id", "file_data", "filename"):
                if src.get(k) is not None:
                    part[k] = src[k]
            parts.append(part)
        elif kind == "input_audio":
            raise unsupported(f"{f}", "responses", "audio input is not available on the Responses API")
        else:
            raise invalid(f"{f}.type", f"unknown content part type {kind!r}")
    return parts


def _call_item(call: Any, field: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise invalid(field, "expected a tool call object")
    kind = call.get("type", "function")
    if kind == "function":
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{field}.function.name", "expected a string")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            raise invalid(f"{field}.function.arguments", "expected a JSON string")
        return {"type": "function_call", "call_id": _call_id(call, field), "name": fn["name"], "arguments": args}
    if kind == "custom":
        c = call.get("custom")
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise invalid(f"{field}.custom.name", "expected a string")
        return {"type": "custom_tool_call", "call_id": _call_id(call, field), "name": c["name"],
                "input": c.get("input") if isinstance(c.get("input"), str) else ""}
    raise invalid(f"{field}.type", f"unknown tool call type {kind!r}")


def _call_id(call: dict[str, Any], field: str) -> str:
    cid = call.get("id")
    if not isinstance(cid, str) or not cid:
        raise invalid(f"{field}.id", "expected a non-empty string")
    return cid


def _tool(tool: Any, i: int) -> dict[str, Any]:
    field = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise invalid(field, "expected a tool object")
    kind = tool.get("type")
    if kind == "function":
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{field}.function.name", "expected a string")
        out = {"type": "function", "name": fn["name"]}
        for k in ("description", "parameters", "strict"):
            if fn.get(k) is not None:
                out[k] = fn[k]
        return out
    if kind == "custom":
        c = tool.get("custom")
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise invalid(f"{field}.custom.name", "expected a string")
        return {"type": "custom", **{k: v for k, v in c.items() if v is not None}}
    raise invalid(f"{field}.type", f"unknown tool type {kind!r}")


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function" and isinstance(choice.get("function"), dict):
            return {"type": "function", "name": choice["function"].get("name")}
        if kind == "custom" and isinstance(choice.get("custom"), dict):
            return {"type": "custom", "name": choice["custom"].get("name")}
        if kind == "allowed_tools" and isinstance(choice.get("allowed_tools"), dict):
            at = choice["allowed_tools"]
            tools = [{"type": "function", "name": t["function"]["name"]}
                     if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
                     for t in at.get("tools") or []]
            return {"type": "allowed_tools", "mode": at.get("mode", "auto"), "tools": tools}
    raise invalid("tool_choice", "expected 'auto', 'none', 'required' or a tool selection object")


def _format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise invalid("response_format.json_schema.name", "expected a string")
        out = {"type": "json_schema", "name": js["name"]}
        for k in ("schema", "strict", "description"):
            if js.get(k) is not None:
                out[k] = js[k]
        return out
    raise invalid("response_format.type", "expected 'text', 'json_object' or 'json_schema'")
