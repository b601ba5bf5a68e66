"""A chat.completion from a chat-only backend, rewritten as the Message an Anthropic client expects.

Content comes in Anthropic's order: thinking (the model's reasoning, signed by the sidecar), text, then
one `tool_use` block per tool call. A refusal is text with `stop_reason: refusal`.
"""

from __future__ import annotations

from typing import Any

from extproc.translate.common import at, first_choice, need, new_id, objects, read
from extproc.translate.messages import message_shell, stop_reason, thinking_block, tool_input, usage_of_chat
from extproc.translate.resp_chat_to_responses import chat_reasoning, message_text


def translate_response(chat: dict[str, Any], model: str, stop: list[str]) -> dict[str, Any]:
    """The Message for a chat.completion; BadUpstream when the answer lacks what it needs."""
    message = message_shell(new_id("msg_"), read(chat, "model", str) or model)
    where, choice = first_choice(chat)
    reply = need(choice, "message", dict, where)
    mw = at(where, "message")
    content = message["content"]
    if (thought := chat_reasoning(reply, mw)) is not None:
        content.append(thinking_block(thought, None))
    text = message_text(reply, mw)
    refusal = read(reply, "refusal", str, mw)
    if text or refusal:
        content.append({"type": "text", "text": text + (refusal or "")})
    for path, call in objects(reply, "tool_calls", mw):
        fn = need(call, "function", dict, path)
        fw = at(path, "function")
        content.append({"type": "tool_use", "id": read(call, "id", str, path) or new_id("toolu_"),
                        "name": need(fn, "name", str, fw),
                        "input": tool_input(read(fn, "arguments", str, fw) or "", at(fw, "arguments"))})
    finish = read(choice, "finish_reason", str, where)
    reason, sequence = stop_reason(finish, choice.get("stop_reason"), stop)
    message["stop_reason"] = "refusal" if refusal and reason == "end_turn" else reason
    message["stop_sequence"] = sequence
    message["usage"] = usage_of_chat(chat) or message["usage"]
    return message
