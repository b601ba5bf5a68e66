"""A Responses API request, rewritten for a backend that only serves /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from extproc.errors import invalid, unsupported
from extproc.translate.common import expect, is_default, text_of
from extproc.translate.tools import ToolMap, custom_arguments, decode_reasoning, hosted_refusal, tool_map

_COPIED = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "prompt_cache_key",
           "safety_identifier", "service_tier", "presence_penalty", "frequency_penalty")
# Accepted and not forwarded: they describe how the Responses API stores or presents the answer,
# which the sidecar does itself.
_LOCAL = ("store", "include", "truncation", "stream_options", "previous_response_id", "client_metadata")
_REFUSED = {
    "background": "background responses need a Responses backend",
    "conversation": "conversations need a Responses backend; use previous_response_id",
    "prompt": "stored prompt templates need a Responses backend",
    "max_tool_calls": "Chat Completions cannot cap the number of tool calls",
}
_KNOWN = {"model", "input", "instructions", "max_output_tokens", "reasoning", "tools", "tool_choice", "text",
          "stream", "top_logprobs", *_COPIED, *_LOCAL, *_REFUSED}


def translate_request(body: dict[str, Any], *, max_tokens_field: str = "max_completion_tokens",
                      hosted_tools: str = "drop", replay_reasoning: bool = False,
                      tools: ToolMap | None = None) -> dict[str, Any]:
    """A conversation the sidecar keeps arrives here already merged into `input` (see `extproc.state.pinning`).

    hosted_tools: `drop` removes tools a chat backend cannot run (the caller reports them), `reject`
    refuses the request. replay_reasoning: send earlier reasoning back as `reasoning_content`.
    """
    for key in body:
        if key not in _KNOWN:
            raise unsupported(key, "chat", "unknown Responses API field")
    for key, why in _REFUSED.items():
        if not is_default(body.get(key)):
            raise unsupported(key, "chat", why)
    out: dict[str, Any] = {"model": body["model"]}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif instructions is not None:
        raise invalid("instructions", "expected a string")
    tools = tools or tool_map(body.get("tools"))
    if tools.hosted and hosted_tools == "reject":
        raise hosted_refusal(tools.hosted[0])
    messages.extend(input_messages(body.get("input"), tools, replay_reasoning))
    if not messages:
        raise invalid("input", "expected a non-empty string or list of input items")
    out["messages"] = messages
    for key in _COPIED:
        if body.get(key) is not None:
            out[key] = body[key]
    _options(body, out, tools, max_tokens_field)
    return out


def _options(body: dict[str, Any], out: dict[str, Any], tools: ToolMap, max_tokens_field: str) -> None:
    """The generation settings, each checked and renamed into `out` (in the order chat servers see them)."""
    max_tokens = expect(body, "max_output_tokens", int, "an integer")
    if max_tokens is not None:
        if max_tokens < 1:
            raise invalid("max_output_tokens", "expected a positive integer")
        out[max_tokens_field] = max_tokens
    reasoning = expect(body, "reasoning", dict, "an object")
    if reasoning and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    if tools.chat_tools:
        out["tools"] = tools.chat_tools
    elif "parallel_tool_calls" in out:
        del out["parallel_tool_calls"]  # chat servers reject it without tools
    if body.get("tool_choice") is not None and tools.chat_tools:
        choice = _tool_choice(body["tool_choice"], tools)
        if choice is not None:
            out["tool_choice"] = choice
    text = expect(body, "text", dict, "an object")
    if text:
        if text.get("format") is not None:
            out["response_format"] = _format(text["format"])
        if text.get("verbosity") is not None:
            out["verbosity"] = text["verbosity"]
    top = expect(body, "top_logprobs", int, "an integer")
    if top:
        out["logprobs"] = True
        out["top_logprobs"] = top
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", "expected a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}


def input_messages(inp: Any, tools: ToolMap | None = None, replay_reasoning: bool = False) -> list[dict[str, Any]]:
    """Responses `input` (a string or a list of items) as chat messages."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}] if inp else []
    if inp is None:
        return []
    if not isinstance(inp, list):
        raise invalid("input", "expected a string or a list of input items")
    tools = tools or ToolMap()
    calls: set[str] = set()
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None  # replayed reasoning waiting for the assistant message it preceded
    for i, item in enumerate(inp):
        field = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(field, "expected an input item object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            _message(item, field, messages)
        elif kind in ("function_call", "custom_tool_call"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{field}.call_id", "expected a non-empty string")
            name = item.get("name")
            args = item.get("arguments", "") if kind == "function_call" else item.get("input", "")
            if not isinstance(name, str) or not isinstance(args, str):
                raise invalid(field, f"a {kind} needs a string 'name' and '{'arguments' if kind == 'function_call' else 'input'}'")
            if kind == "custom_tool_call":
                args = custom_arguments(args)
            call = {"id": call_id, "type": "function",
                    "function": {"name": tools.chat_name(name, item.get("namespace")), "arguments": args}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            calls.add(call_id)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise invalid(f"{field}.call_id", f"no tool call with call_id {call_id!r} precedes this output")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": text_of(item.get("output"), f"{field}.output", ("input_text", "output_text"))})
        elif kind == "reasoning":
            # Never replayed as text. Restored as reasoning_content only where the backend takes it.
            reasoning = decode_reasoning(item) if replay_reasoning else None
            continue
        elif kind == "item_reference":
            raise unsupported(field, "chat", "item references need a Responses backend")
        else:
            raise invalid(f"{field}.type", f"unknown or untranslatable input item type {kind!r}")
        if reasoning is not None and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("reasoning_content", reasoning)
        reasoning = None
    return messages


def _message(item: dict[str, Any], field: str, messages: list[dict[str, Any]]) -> None:
    role = item.get("role")
    content = item.get("content")
    if role in ("user", "system", "developer"):
        messages.append({"role": "user" if role == "user" else "system", "content": _parts(content, f"{field}.content")})
    elif role == "assistant":
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "refusal" for p in content):
            messages.append({"role": "assistant", "content": None,
                             "refusal": text_of(content, f"{field}.content", ("output_text", "refusal"))})
        else:
            messages.append({"role": "assistant",
                             "content": text_of(content, f"{field}.content", ("output_text", "input_text"))})
    else:
        raise invalid(f"{field}.role", f"unknown role {role!r}")


def _parts(content: Any, field: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(field, "expected a string or a non-empty list of content parts")
    parts: list[dict[str, Any]] = []
    for i, p in enumerate(content):
        f = f"{field}[{i}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text"):
            if not isinstance(p.get("text"), str):
                raise invalid(f"{f}.text", "expected a string")
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "input_image":
            if not isinstance(p.get("image_url"), str):
                raise unsupported(f"{f}.file_id" if p.get("file_id") else f"{f}.image_url", "chat",
                                  "chat backends take images by URL or data URL only")
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p.get("detail") or "auto"}})
        elif kind == "input_file":
            if p.get("file_url"):
                raise unsupported(f"{f}.file_url", "chat", "chat backends take files as file_data or file_id")
            parts.append({"type": "file", "file": {k: p[k] for k in ("file_id", "file_data", "filename") if p.get(k)}})
        elif kind == "input_audio":
            raise unsupported(f, "chat", "audio input cannot be translated")
        else:
            raise invalid(f"{f}.type", f"unknown content part type {kind!r}")
    if len(parts) == 1 and parts[0]["type"] == "text":
        text: str = parts[0]["text"]
        return text  # the plain form every chat server accepts
    return parts


def _tool_choice(choice: Any, tools: ToolMap) -> Any:
    """None when the choice named a hosted tool that was dropped: the model then chooses freely."""
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": tools.chat_name(choice["name"], choice.get("namespace"))}}
        if kind == "allowed_tools":
            allowed = []
            for i, t in enumerate(choice.get("tools") or []):
                if not isinstance(t, dict) or t.get("type") not in ("function", "custom"):
                    continue  # a hosted tool: dropped along with the tool itself
                name = t.get("name")
                if not isinstance(name, str):
                    raise invalid(f"tool_choice.tools[{i}].name", "expected a string")
                allowed.append({"type": "function", "function": {"name": tools.chat_name(name, t.get("namespace"))}})
            return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": allowed}}
        if kind in tools.hosted:
            return None
        raise unsupported("tool_choice", "chat", f"the hosted tool {kind!r} cannot run on a chat backend")
    raise invalid("tool_choice", "expected 'auto', 'none', 'required' or a tool selection object")


def _format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str):
            raise invalid("text.format.name", "expected a string")
        js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": js}
    raise invalid("text.format.type", "expected 'text', 'json_object' or 'json_schema'")
