"""Responses tools on a chat backend: namespaces flattened, custom tools wrapped, hosted tools dropped.

Chat Completions only knows function tools with JSON arguments. Both directions derive the same
`ToolMap` from the request's `tools`, so a chat tool call maps back to the item the client expects
(`function_call` with its `namespace`, or `custom_tool_call` with its free-form `input`) without any
state kept between request and response.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.errors import invalid, unsupported

NAMESPACE_SEP = "__"
# encrypted_content the sidecar writes for a chat model's reasoning: readable back, by it only.
REASONING_PREFIX = "extproc.r1."
_CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {
    "type": "string", "description": "The complete raw input for this tool, as free-form text."}},
    "required": ["input"], "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ChatName:
    """What a chat function name stands for on the Responses side."""

    name: str
    namespace: str | None = None
    custom: bool = False


@dataclass(slots=True)
class ToolMap:
    chat_tools: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, ChatName] = field(default_factory=dict)  # chat function name -> Responses tool
    hosted: list[str] = field(default_factory=list)  # hosted tool types, which a chat backend cannot run

    def chat_name(self, name: str, namespace: str | None) -> str:
        return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name

    def call_item(self, chat_name: str, call_id: str, arguments: str, item_id: str, status: str) -> dict[str, Any]:
        """The Responses output item for one chat tool call."""
        target = self.names.get(chat_name, ChatName(chat_name))
        if target.custom:
            item: dict[str, Any] = {"type": "custom_tool_call", "id": item_id, "call_id": call_id,
                                    "name": target.name, "input": custom_input(arguments), "status": status}
        else:
            item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": target.name,
                    "arguments": arguments, "status": status}
        if target.namespace:
            item["namespace"] = target.namespace
        return item

    def is_custom(self, chat_name: str) -> bool:
        target = self.names.get(chat_name)
        return target is not None and target.custom


def custom_input(arguments: str) -> str:
    """A custom tool's free-form input back out of the one-string-argument function call."""
    try:
        doc = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments  # not JSON: the model wrote the input itself
    given = doc.get("input") if isinstance(doc, dict) else None
    return given if isinstance(given, str) else arguments


def custom_arguments(text: str) -> str:
    return orjson.dumps({"input": text}).decode()


def tool_map(tools: Any) -> ToolMap:
    out = ToolMap()
    if not tools:
        return out
    if not isinstance(tools, list):
        raise invalid("tools", "expected a list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools[{i}]", "expected a tool object")
        kind = tool.get("type")
        if kind == "namespace":
            ns = tool.get("name")
            if not isinstance(ns, str) or not ns:
                raise invalid(f"tools[{i}].name", "expected a string")
            for j, inner in enumerate(tool.get("tools") or ()):
                _add(out, inner, f"tools[{i}].tools[{j}]", ns)
        elif kind in ("function", "custom"):
            _add(out, tool, f"tools[{i}]", None)
        else:
            out.hosted.append(str(kind))
    return out


def _add(out: ToolMap, tool: Any, field: str, namespace: str | None) -> None:
    kind = tool.get("type") if isinstance(tool, dict) else None
    name = tool.get("name") if isinstance(tool, dict) else None
    if kind not in ("function", "custom") or not isinstance(name, str) or not name:
        raise invalid(field, "expected a function or custom tool with a name")
    chat_name = out.chat_name(name, namespace)
    if chat_name in out.names:
        raise invalid(f"{field}.name", f"tool name {chat_name!r} is given twice")
    out.names[chat_name] = ChatName(name, namespace, kind == "custom")
    fn: dict[str, Any] = {"name": chat_name}
    description = tool.get("description") or ""
    if not isinstance(description, str):
        raise invalid(f"{field}.description", "expected a string")
    if namespace:
        description = f"[{namespace}] {description}".strip()
    if kind == "custom":
        fmt = tool.get("format") or {}
        if not isinstance(fmt, dict):
            raise invalid(f"{field}.format", "expected a format object")
        if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
            description += f"\nThe input must follow this {fmt.get('syntax', '')} grammar:\n{fmt['definition']}"
        fn["parameters"] = _CUSTOM_PARAMETERS
    else:
        for k in ("parameters", "strict"):
            if tool.get(k) is not None:
                fn[k] = tool[k]
    if description:
        fn["description"] = description
    out.chat_tools.append({"type": "function", "function": fn})


def hosted_refusal(kind: str) -> Exception:
    return unsupported("tools", "chat", f"the hosted tool {kind!r} cannot run on a chat backend "
                                        "(this backend is configured with hosted_tools: reject)")


def encode_reasoning(text: str) -> str:
    return REASONING_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


def decode_reasoning(item: dict[str, Any]) -> str | None:
    """Reasoning text of a replayed item: ours from encrypted_content, else its visible text, else None."""
    enc = item.get("encrypted_content")
    if isinstance(enc, str) and enc.startswith(REASONING_PREFIX):
        try:
            return base64.b64decode(enc[len(REASONING_PREFIX):], altchars=b"-_", validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    parts = [p["text"] for key in ("content", "summary") for p in item.get(key) or ()
             if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts) or None
