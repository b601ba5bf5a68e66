"""Anthropic's Messages API, read once for any OpenAI-style upstream: the request checked into plain
parts, and the answer pieces (stop reasons, usage, thinking signatures) both upstream directions share.

A Messages request is decoded here, field by field, into `MessagesRequest`; `req_messages_to_chat` and
`req_messages_to_responses` only arrange those parts in their API's shape. What no OpenAI API can carry
is refused naming the field; what only changes sampling (`top_k`, and `stop_sequences` on Responses)
is dropped and named in `dropped`, which the client sees as a response header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.errors import BadUpstream, invalid, unsupported
from extproc.ops.usage import BYTES_PER_TOKEN
from extproc.translate.common import NUMBER, count, expect, json_type, read
from extproc.translate.tools import REASONING_PREFIX, encode_reasoning

_ACCEPTED = {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
             "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config"}
# Accepted and not forwarded: how Anthropic's own service places, caches, bills or reports a request.
_LOCAL = {"service_tier", "cache_control", "inference_geo", "speed", "diagnostics", "user_profile_id", "workspace_id"}
_REFUSED = {
    "container": "code-execution containers run only on Anthropic",
    "mcp_servers": "remote MCP servers are connected by Anthropic's own service",
}
# Dropped and named: Anthropic's service would trim the context (Claude Code asks for it); elsewhere the
# whole context is sent, which asks more of the model but changes no answer the client can rely on.
_DROPPED = ("context_management",)
# thinking.budget_tokens -> the effort an OpenAI reasoning model is asked for
_EFFORTS = ((4096, "low"), (16384, "medium"))
_OUTPUT_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Image:
    url: str  # a URL, or a data URL for base64 data


@dataclass(frozen=True, slots=True)
class ToolUse:
    id: str
    name: str
    input: dict[str, Any]

    @property
    def arguments(self) -> str:
        return orjson.dumps(self.input).decode()


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_use_id: str
    content: list[Text | Image]
    is_error: bool
    field: str

    def text(self) -> str:
        """The result as text: chat tool messages carry no images. A failed tool says so in words,
        the only way an OpenAI model hears of it."""
        parts = []
        for i, part in enumerate(self.content):
            if isinstance(part, Image):
                raise unsupported(f"{self.field}.content[{i}]", "chat", "chat tool messages carry text only")
            parts.append(part.text)
        text = "".join(parts)
        return f"Error: {text}" if self.is_error else text


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str
    signature: str

    @property
    def ours(self) -> bool:
        """Signed by the sidecar (reasoning of a model that has no signatures): nothing to hand back."""
        return self.signature.startswith(REASONING_PREFIX)


Block = Text | Image | ToolUse | ToolResult | Thinking


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # user | assistant | system (an instruction at its place in the conversation)
    blocks: list[Block]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: str  # auto | any | tool | none
    name: str | None
    parallel: bool


@dataclass(slots=True)
class MessagesRequest:
    model: str
    max_tokens: int
    system: str | None
    turns: list[Turn]
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    user: str | None = None
    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice | None = None
    effort: str | None = None  # thinking asked for, as an OpenAI reasoning effort
    schema: dict[str, Any] | None = None  # structured output: the JSON schema the answer follows
    dropped: list[str] = field(default_factory=list)  # fields the target API has no place for


def read_request(body: dict[str, Any], target_api: str) -> MessagesRequest:
    """The Messages request checked: a 400 naming the field for whatever cannot be used."""
    for key in body:
        if key not in _ACCEPTED and key not in _LOCAL and key not in _REFUSED and key not in _DROPPED:
            raise unsupported(key, target_api, "unknown Messages API field")
    for key, why in _REFUSED.items():
        if body.get(key) is not None:
            raise unsupported(key, target_api, why)
    max_tokens = expect(body, "max_tokens", int, "an integer")
    if max_tokens is None or max_tokens < 1:
        raise invalid("max_tokens", "is required: a positive integer")
    stream = expect(body, "stream", bool, "a boolean")
    req = MessagesRequest(model=body["model"], max_tokens=max_tokens, system=_system(body.get("system")),
                          turns=_turns(body.get("messages"), target_api), stream=bool(stream))
    req.temperature = expect(body, "temperature", NUMBER, "a number")
    req.top_p = expect(body, "top_p", NUMBER, "a number")
    if expect(body, "top_k", int, "an integer") is not None:
        req.dropped.append("top_k")
    req.dropped += [key for key in _DROPPED if body.get(key) is not None]
    stop = expect(body, "stop_sequences", list, "a list of strings") or []
    if not all(isinstance(s, str) for s in stop):
        raise invalid("stop_sequences", "expected a list of strings")
    req.stop = stop
    metadata = expect(body, "metadata", dict, "an object") or {}
    for key in metadata:
        if key != "user_id":
            raise unsupported(f"metadata.{key}", target_api, "the Messages API defines only metadata.user_id")
    req.user = expect(metadata, "user_id", str, "a string") if metadata else None
    req.tools = _tools(body.get("tools"), target_api)
    req.choice = _choice(body.get("tool_choice"), {t.name for t in req.tools})
    req.effort = _effort(body.get("thinking"))
    output = expect(body, "output_config", dict, "an object") or {}
    effort = expect(output, "effort", str, "a string") if output else None
    if effort is not None:
        if effort not in _OUTPUT_EFFORTS:
            raise invalid("output_config.effort", f"expected one of {', '.join(_OUTPUT_EFFORTS)}")
        req.effort = _OUTPUT_EFFORTS[effort]
    fmt = expect(output, "format", dict, "an object") if output else None
    if fmt is not None:
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise invalid("output_config.format", "expected {'type': 'json_schema', 'schema': {...}}")
        req.schema = fmt["schema"]
    return req


ESTIMATED_HEADER = "x-gateway-estimated"  # the answer's count is the sidecar's estimate, not the model's


def estimated_input_tokens(body: dict[str, Any]) -> int:
    """A count_tokens request for a model whose API cannot count: checked as a Messages request (a
    400 naming the field), then estimated at the usage estimate's rate (bytes of its text and tools)."""
    read_request({**body, "max_tokens": 1}, "chat")
    text = orjson.dumps([body.get(k) for k in ("system", "messages", "tools")])
    return max(1, len(text) // BYTES_PER_TOKEN)


def _system(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        raise invalid("system", "expected a string or a list of text blocks")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise invalid(f"system[{i}]", "expected a text block")
        texts.append(block["text"])
    return "\n\n".join(texts) or None


def _turns(messages: Any, target_api: str) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of messages")
    turns: list[Turn] = []
    calls: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected a message object")
        role = m.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"{where}.role", f"expected 'user', 'assistant' or 'system', got {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            blocks: list[Block] = [Text(content)]
        elif isinstance(content, list):
            found = (_block(b, f"{where}.content[{j}]", role, calls, target_api) for j, b in enumerate(content))
            blocks = [b for b in found if b is not None]
        else:
            raise invalid(f"{where}.content", "expected a string or a list of content blocks")
        turns.append(Turn(role, blocks))
    return turns


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key}", "expected a string")
    return value


def _block(block: Any, where: str, role: str, calls: set[str], target_api: str) -> Block | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(block, dict):
        raise invalid(where, "expected a content block object")
    if kind == "text":
        return Text(_string(block, "text", where))
    if role == "system":
        raise invalid(f"{where}.type", "a system message holds text blocks only")
    if kind == "image" and role == "user":
        return _image(block, where, target_api)
    if kind == "tool_use" and role == "assistant":
        tool_input = block.get("input")
        if not isinstance(tool_input, dict):
            raise invalid(f"{where}.input", "expected an object")
        use = ToolUse(_string(block, "id", where), _string(block, "name", where), tool_input)
        calls.add(use.id)
        return use
    if kind == "tool_result" and role == "user":
        use_id = _string(block, "tool_use_id", where)
        if use_id not in calls:
            raise invalid(f"{where}.tool_use_id", f"no tool_use with id {use_id!r} precedes this result")
        is_error = expect(block, "is_error", bool, "a boolean")
        return ToolResult(use_id, _result_content(block.get("content"), f"{where}.content", target_api), bool(is_error), where)
    if kind == "thinking" and role == "assistant":
        return Thinking(_string(block, "thinking", where), _string(block, "signature", where))
    if kind == "redacted_thinking" and role == "assistant":
        return None  # encrypted for Anthropic's models only: nothing another model can read
    if kind == "document":
        raise unsupported(where, target_api, "documents (PDF, plain-text sources) need an Anthropic backend")
    raise invalid(f"{where}.type", f"unknown or untranslatable content block type {kind!r} in a {role} message")


def _image(block: dict[str, Any], where: str, target_api: str) -> Image:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if not isinstance(source, dict):
        raise invalid(f"{where}.source", "expected an image source object")
    if kind == "base64":
        media = _string(source, "media_type", f"{where}.source")
        return Image(f"data:{media};base64,{_string(source, 'data', f'{where}.source')}")
    if kind == "url":
        return Image(_string(source, "url", f"{where}.source"))
    raise unsupported(f"{where}.source.type", target_api, "images are taken as base64 data or a URL")


def _result_content(content: Any, where: str, target_api: str) -> list[Text | Image]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)]
    if not isinstance(content, list):
        raise invalid(where, "expected a string or a list of text and image blocks")
    out: list[Text | Image] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block, dict):
            out.append(Text(_string(block, "text", f"{where}[{i}]")))
        elif kind == "image" and isinstance(block, dict):
            out.append(_image(block, f"{where}[{i}]", target_api))
        else:
            raise invalid(f"{where}[{i}].type", "expected a text or image block")
    return out


def _tools(tools: Any, target_api: str) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools", "expected a list")
    out: list[Tool] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(where, "expected a tool object")
        if tool.get("type") not in (None, "custom"):
            raise unsupported(f"{where}.type", target_api, f"the server tool {tool.get('type')!r} runs only on Anthropic")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"{where}.name", "expected a non-empty string")
        if name in names:
            raise invalid(f"{where}.name", f"tool name {name!r} is given twice")
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise invalid(f"{where}.input_schema", "expected a JSON schema object")
        description = tool.get("description") or ""
        if not isinstance(description, str):
            raise invalid(f"{where}.description", "expected a string")
        out.append(Tool(name, description, schema))
    return out


def _choice(choice: Any, names: set[str]) -> ToolChoice | None:
    if choice is None:
        return None
    mode = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or mode not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice.type", "expected 'auto', 'any', 'tool' or 'none'")
    name = None
    if mode == "tool":
        name = _string(choice, "name", "tool_choice")
        if name not in names:
            raise invalid("tool_choice.name", f"no tool named {name!r} is given in tools")
    disable = expect(choice, "disable_parallel_tool_use", bool, "a boolean")
    return ToolChoice(mode, name, not disable)


def _effort(thinking: Any) -> str | None:
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if not isinstance(thinking, dict) or kind not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise invalid("thinking.type", "expected 'enabled', 'disabled', 'adaptive' or 'between_tools'")
    if kind == "disabled":
        return None
    budget = expect(thinking, "budget_tokens", int, "an integer")
    if kind == "enabled" and (budget is None or budget < 1):
        raise invalid("thinking.budget_tokens", "is required with thinking enabled: a positive integer")
    if budget is None:
        return "medium"
    return next((effort for limit, effort in _EFFORTS if budget < limit), "high")


# -- the answer -------------------------------------------------------------------------------------

# chat finish_reason -> Messages stop_reason
STOP_OF_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                  "content_filter": "refusal"}


def stop_reason(finish: str | None, matched: Any, stop: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat finish; `matched` is the stop string a server names
    (vLLM's `stop_reason`), which is the only way to tell a stop sequence from the end of the turn."""
    if finish == "stop" and isinstance(matched, str) and matched in stop:
        return "stop_sequence", matched
    return STOP_OF_FINISH.get(finish or "stop", "end_turn"), None


def stop_of_status(status: str | None, incomplete_reason: str | None, called_tools: bool) -> str:
    """The stop_reason of a Response's status and incomplete reason."""
    if status == "incomplete":
        return "refusal" if incomplete_reason == "content_filter" else "max_tokens"
    return "tool_use" if called_tools else "end_turn"


def usage(inp: int, out: int, cached: int) -> dict[str, Any]:
    """Messages usage: Anthropic counts cached input apart from `input_tokens`, OpenAI within it."""
    return {"input_tokens": max(inp - cached, 0), "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": out}


def usage_from(doc: dict[str, Any], where: str, input_key: str, output_key: str, details: str) -> dict[str, Any] | None:
    """Messages usage for the `usage` of an upstream answer (chat or Responses names), checked."""
    u = read(doc, "usage", dict, where)
    if u is None:
        return None
    uw = f"{where}.usage" if where else "usage"
    cached = count(read(u, details, dict, uw) or {}, "cached_tokens", f"{uw}.{details}")
    return usage(count(u, input_key, uw), count(u, output_key, uw), cached)


def usage_of_chat(doc: dict[str, Any], where: str = "") -> dict[str, Any] | None:
    return usage_from(doc, where, "prompt_tokens", "completion_tokens", "prompt_tokens_details")


def usage_of_responses(doc: dict[str, Any], where: str = "") -> dict[str, Any] | None:
    return usage_from(doc, where, "input_tokens", "output_tokens", "input_tokens_details")


def accounted(message: dict[str, Any], reported: bool) -> dict[str, Any]:
    """A Message as the usage accounting reads answers: input counted whole, cached input within it;
    no usage when the upstream reported none (the accounting then estimates it)."""
    if not reported:
        return {"usage": None, "output": message.get("content")}
    u = message.get("usage") or {}
    cached = u.get("cache_read_input_tokens", 0)
    total = u.get("input_tokens", 0) + u.get("cache_creation_input_tokens", 0) + cached
    return {"usage": {"input_tokens": total, "output_tokens": u.get("output_tokens", 0),
                      "input_tokens_details": {"cached_tokens": cached}},
            "output": message.get("content")}


def tool_input(arguments: str, where: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the `input` object of a tool_use block (none: an empty object)."""
    if not arguments.strip():
        return {}
    try:
        doc = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise BadUpstream(where, "is not JSON") from None
    if not isinstance(doc, dict):
        raise BadUpstream(where, f"is {json_type(doc)}, expected a JSON object")
    return doc


def thinking_block(text: str, signature: str | None) -> dict[str, Any]:
    """A thinking block: an upstream's own signature when it sent one, else the sidecar's (the SDKs
    require one, and it tells the sidecar the block needs no handing back)."""
    return {"type": "thinking", "thinking": text, "signature": signature or encode_reasoning(text)}


def message_shell(message_id: str, model: str) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage(0, 0, 0)}
