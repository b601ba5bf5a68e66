"""One translator pair per (client API, upstream API), behind one interface, picked once per request.

A pair owns what is specific to its direction: the request rewrite, the buffered answer and a stream
translator for streamed answers. Per-request facts (the tool map) are built once and shared by all
three steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from extproc.api import CHAT, MESSAGES, RESPONSES
from extproc.config import Backend
from extproc.translate import (
    req_chat_to_messages,
    req_chat_to_responses,
    req_messages_to_chat,
    req_messages_to_responses,
    req_responses_to_chat,
    resp_chat_to_messages,
    resp_chat_to_responses,
    resp_messages_to_chat,
    resp_responses_to_chat,
    resp_responses_to_messages,
)
from extproc.translate.common import new_id
from extproc.translate.responses_on_messages import SealThinking, blocks_of, seal_output, thinking_runs
from extproc.translate.stream_chat_to_messages import ChatToMessagesStream
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from extproc.translate.stream_messages_to_chat import MessagesToChatStream
from extproc.translate.stream_responses_to_chat import ResponsesToChatStream
from extproc.translate.stream_responses_to_messages import ResponsesToMessagesStream
from extproc.translate.tools import ToolMap, tool_map


class StreamTranslator(Protocol):
    @property
    def response(self) -> dict[str, Any] | None: ...  # the final Response object, once the stream has ended
    @property
    def upstream_model(self) -> str | None: ...  # the model the upstream's stream named (the GenAI response model)

    def feed(self, data: bytes) -> bytes: ...
    def close(self) -> bytes: ...
    def replay(self, doc: dict[str, Any]) -> bytes: ...  # a whole JSON answer, as the stream that carries it
    def fail(self, code: str, message: str) -> bytes: ...


@dataclass(slots=True)
class Answer:
    """A translated buffered answer: the client's body, and the Response object when one was made
    (a Responses client on a chat backend: the sidecar keeps it for `previous_response_id`)."""

    body: dict[str, Any]
    response: dict[str, Any] | None = None


class TranslatorPair(Protocol):
    client_api: str
    upstream_api: str
    dropped_tools: list[str]  # hosted tools removed for a chat backend, reported to the client
    dropped_fields: list[str]  # request fields the upstream API has no place for, reported to the client

    def request(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def response(self, doc: dict[str, Any]) -> Answer: ...
    def stream(self) -> StreamTranslator: ...


class _Answers(Protocol):
    """A `resp_*` module whose answer needs only the model's name (its function is looked up at each
    answer, so the module's current one is used)."""

    def translate_response(self, doc: dict[str, Any], model: str, /) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Steps:
    """A direction's three steps when each needs only the request and the model's name; `request`
    also returns the fields dropped for want of an upstream equivalent."""

    request: Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]
    answers: _Answers
    stream: Callable[[dict[str, Any], str], StreamTranslator]


_STEPS = {
    # A Chat Completions client on a model that answers only on the Responses API.
    (CHAT, RESPONSES): _Steps(lambda body: (req_chat_to_responses.translate_request(body), []),
                              resp_responses_to_chat, ResponsesToChatStream),
    # A Chat Completions client on a backend that serves only Anthropic's Messages API.
    (CHAT, MESSAGES): _Steps(lambda body: (req_chat_to_messages.translate_request(body), []),
                             resp_messages_to_chat, MessagesToChatStream),
    # An Anthropic Messages client on a model that answers only on the Responses API.
    (MESSAGES, RESPONSES): _Steps(req_messages_to_responses.translate_request,
                                  resp_responses_to_messages,
                                  lambda _request, model: ResponsesToMessagesStream(model)),
}


@dataclass(slots=True)
class ModelPair:
    """A pair for a direction whose steps need only the request and the model's name (`_STEPS`): one
    class serves them all."""

    client_api: str
    upstream_api: str
    request_body: dict[str, Any]
    model: str
    steps: _Steps = field(init=False)
    dropped_tools: list[str] = field(default_factory=list)
    dropped_fields: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = _STEPS[self.client_api, self.upstream_api]

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        out, self.dropped_fields = self.steps.request(body)
        return out

    def response(self, doc: dict[str, Any]) -> Answer:
        return Answer(self.steps.answers.translate_response(doc, self.model))

    def stream(self) -> StreamTranslator:
        return self.steps.stream(self.request_body, self.model)


@dataclass(slots=True)
class _ResponsesClient:
    """What both pairs of a Responses client keep: its tools read once for all three steps, the hosted
    ones the upstream cannot run reported as dropped."""

    request_body: dict[str, Any]
    backend: Backend
    tools: ToolMap = field(init=False)
    dropped_tools: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.tools = tool_map(self.request_body.get("tools"))
        self.dropped_tools = self.tools.hosted


@dataclass(slots=True)
class ResponsesOnChat(_ResponsesClient):
    """A Responses client on a chat-only model: the conversation so far arrives merged into `input`."""

    client_api: str = RESPONSES
    upstream_api: str = CHAT
    dropped_fields: list[str] = field(default_factory=list)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        b = self.backend
        return req_responses_to_chat.translate_request(body, max_tokens_field=b.chat_max_tokens_field,
                                                       hosted_tools=b.hosted_tools,
                                                       replay_reasoning=b.replay_reasoning, tools=self.tools)

    def response(self, doc: dict[str, Any]) -> Answer:
        resp = resp_chat_to_responses.translate_response(doc, self.request_body, new_id("resp_"), tools=self.tools)
        return Answer(resp, resp)

    def stream(self) -> StreamTranslator:
        return ChatToResponsesStream(self.request_body, tools=self.tools)


@dataclass(slots=True)
class MessagesOnChat:
    """An Anthropic Messages client on a chat-only model."""

    request_body: dict[str, Any]
    model: str
    backend: Backend
    client_api: str = MESSAGES
    upstream_api: str = CHAT
    dropped_tools: list[str] = field(default_factory=list)
    dropped_fields: list[str] = field(default_factory=list)

    @property
    def stop(self) -> list[str]:
        stop = self.request_body.get("stop_sequences")
        return stop if isinstance(stop, list) else []

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        out, self.dropped_fields = req_messages_to_chat.translate_request(
            body, max_tokens_field=self.backend.chat_max_tokens_field, replay_reasoning=self.backend.replay_reasoning)
        return out

    def response(self, doc: dict[str, Any]) -> Answer:
        return Answer(resp_chat_to_messages.translate_response(doc, self.model, self.stop))

    def stream(self) -> StreamTranslator:
        return ChatToMessagesStream(self.model, self.stop)


class Chained:
    """Two stream translators in a row: each upstream chunk through the first, its output through the
    second. The second's Response is the stream's."""

    def __init__(self, first: StreamTranslator, second: StreamTranslator,
                 answer: Callable[[dict[str, Any]], dict[str, Any]]):
        self.first, self.second, self.answer = first, second, answer

    @property
    def response(self) -> dict[str, Any] | None:
        return self.second.response

    @property
    def upstream_model(self) -> str | None:
        return self.first.upstream_model  # the first reads the upstream's stream

    def feed(self, data: bytes) -> bytes:
        return self.second.feed(self.first.feed(data))

    def close(self) -> bytes:
        return self.second.feed(self.first.close()) + self.second.close()

    def replay(self, doc: dict[str, Any]) -> bytes:
        return self.second.replay(self.answer(doc))

    def fail(self, code: str, message: str) -> bytes:
        return self.second.fail(code, message)


@dataclass(slots=True)
class ResponsesOnMessages(_ResponsesClient):
    """A Responses client on a Messages backend: through the chat shape both directions already have
    (Responses as chat, chat as Messages, and back), with the turns kept by the sidecar as on a chat
    backend. Thinking comes back as reasoning items that seal the signed blocks, handed back to Claude
    when they return (`responses_on_messages`)."""

    model: str
    client_api: str = RESPONSES
    upstream_api: str = MESSAGES
    dropped_fields: list[str] = field(default_factory=list)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        chat = req_responses_to_chat.translate_request(body, hosted_tools=self.backend.hosted_tools, tools=self.tools)
        return req_chat_to_messages.translate_request(chat, thinking=thinking_runs(body.get("input")))

    def _chat(self, doc: dict[str, Any]) -> dict[str, Any]:
        return resp_messages_to_chat.translate_response(doc, self.model)

    def response(self, doc: dict[str, Any]) -> Answer:
        resp = resp_chat_to_responses.translate_response(self._chat(doc), self.request_body, new_id("resp_"),
                                                         tools=self.tools)
        seal_output(resp["output"], blocks_of(doc))
        return Answer(resp, resp)

    def stream(self) -> StreamTranslator:
        messages = MessagesToChatStream({"stream_options": {"include_usage": True}}, self.model)
        return SealThinking(Chained(messages, ChatToResponsesStream(self.request_body, tools=self.tools), self._chat),
                            messages)


def pair_for(client_api: str, upstream_api: str, body: dict[str, Any], model: str,
             backend: Backend) -> TranslatorPair | None:
    """The pair for this direction, or None when both sides speak the same API."""
    if client_api == upstream_api:
        return None
    if (client_api, upstream_api) in _STEPS:
        return ModelPair(client_api, upstream_api, body, model)
    if client_api == MESSAGES:
        return MessagesOnChat(body, model, backend)
    if upstream_api == MESSAGES:
        return ResponsesOnMessages(body, backend, model)
    return ResponsesOnChat(body, backend)
