"""A chat.completion from a chat-only backend, rewritten as the Response object a Responses client expects.

The Response echoes the request's settings with every field the Responses API always sends, so
strict clients (and the Open Responses schema) accept it.
"""

from __future__ import annotations

from typing import Any

from extproc.errors import BadUpstream
from extproc.translate.common import FINISH_TO_STATUS, new_id, now
from extproc.translate.tools import ToolMap, encode_reasoning, tool_map
from extproc.translate.wire import ChatCompletion, ChatMessage, convert


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") == "function":
        return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                "parameters": tool.get("parameters"), "strict": tool.get("strict")}
    return tool


def response_shell(request: dict[str, Any], response_id: str, created_at: int) -> dict[str, Any]:
    """A Response with the request's settings echoed; status, output and usage are filled by the caller."""
    reasoning: dict[str, Any] = request["reasoning"] if isinstance(request.get("reasoning"), dict) else {}
    text = dict(request["text"]) if isinstance(request.get("text"), dict) else {}
    text.setdefault("format", {"type": "text"})
    fmt = text["format"]
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        text["format"] = {"description": None, "strict": False, **fmt}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "completed_at": None,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions") if isinstance(request.get("instructions"), str) else None,
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True) is not False,
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": request.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": request.get("safety_identifier"),
        "service_tier": request.get("service_tier") or "default",
        "store": request.get("store", True) is not False,
        "temperature": request.get("temperature", 1.0),
        "text": text,
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": [_echo_tool(t) for t in request.get("tools") or [] if isinstance(t, dict)],
        "top_logprobs": request.get("top_logprobs") or 0,
        "top_p": request.get("top_p", 1.0),
        "presence_penalty": request.get("presence_penalty", 0.0),
        "frequency_penalty": request.get("frequency_penalty", 0.0),
        "truncation": request.get("truncation") or "disabled",
        "usage": None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def message_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}]}


def wants_encrypted_reasoning(request: dict[str, Any]) -> bool:
    """Clients that keep no server state (Codex: store false) ask for reasoning they can replay."""
    include = request.get("include")
    return isinstance(include, list) and "reasoning.encrypted_content" in include


def call_item_id(tools: ToolMap, chat_name: str) -> str:
    return new_id("ctc_" if tools.is_custom(chat_name) else "fc_")


def finish(resp: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> None:
    """Set status, incomplete_details, completed_at and (Responses) usage from a chat finish_reason."""
    status, reason = FINISH_TO_STATUS.get(finish_reason, ("completed", None))
    resp["status"] = status
    resp["incomplete_details"] = {"reason": reason} if reason else None
    resp["completed_at"] = now() if status == "completed" else None
    resp["usage"] = usage


def chat_reasoning(message: dict[str, Any], where: str) -> str | None:
    """Reasoning text of a chat message read as a dict, as vLLM (`reasoning_content`), OpenRouter/Ollama
    (`reasoning`) and others send it."""
    return convert(message, ChatMessage, "message", where).reasoning_text()


def message_text(message: dict[str, Any], where: str) -> str:
    """A chat message's content read as a dict: a string, or (some servers, even on the response side)
    text parts."""
    return convert(message, ChatMessage, "message", where).text()


def translate_response(doc: dict[str, Any], request: dict[str, Any], response_id: str | None = None,
                       tools: ToolMap | None = None) -> dict[str, Any]:
    """The Response for a chat.completion; BadUpstream when the answer lacks what it needs."""
    chat = convert(doc, ChatCompletion, "body")
    resp = response_shell(request, response_id or new_id("resp_"), chat.created or now())
    if chat.model:
        resp["model"] = chat.model
    at_choice, choice = chat.first_choice()
    message = choice.message
    if message is None:
        raise BadUpstream(f"{at_choice}.message", "is missing")
    where = f"{at_choice}.message"
    reason = choice.finish_reason
    item_status = "incomplete" if reason in ("length", "content_filter") else "completed"
    output = resp["output"]
    if (thought := message.reasoning_text()) is not None:
        output.append(reasoning_item(new_id("rs_"), thought))
        if wants_encrypted_reasoning(request):
            output[-1]["encrypted_content"] = encode_reasoning(thought)
    content = message.text()
    if content or message.refusal:
        output.append(message_item(new_id("msg_"), content, item_status, message.refusal))
    tools = tools or tool_map(request.get("tools"))
    for i, call in enumerate(message.tool_calls or ()):
        path = f"{where}.tool_calls[{i}]"
        if call.function is None:
            raise BadUpstream(f"{path}.function", "is missing")
        name = call.function.name
        if name is None:
            raise BadUpstream(f"{path}.function.name", "is missing")
        output.append(tools.call_item(name, call.id or new_id("call_"), call.function.arguments or "",
                                      call_item_id(tools, name), item_status))
    if not output:
        output.append(message_item(new_id("msg_"), "", item_status))
    finish(resp, reason, chat.usage.as_responses() if chat.usage else None)
    if chat.service_tier:
        resp["service_tier"] = chat.service_tier
    return resp
