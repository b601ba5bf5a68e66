"""The upstream answers the translators read, as typed models decoded once (msgspec).

Each model names only the fields a translator reads; every other field is ignored, as before, so
whatever a provider adds still passes. A value of the wrong type fails the decode with its JSON path,
raised as `BadUpstream` (502 `bad_upstream_response`) like every other fault of an upstream answer.
Stream events are decoded from their text straight into these models, at less cost than orjson.loads
alone; a buffered answer arrives as the exchange's decoded dict and is converted (benchmarks/micro.py
measures both against the hand checks they replace).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from extproc.errors import BadUpstream

Count = Annotated[int, msgspec.Meta(ge=0)]  # token counts and timestamps
M = TypeVar("M", bound=msgspec.Struct)


class _Model(msgspec.Struct):
    """Unknown fields are ignored; absent and null fields are None."""


# -- Chat Completions --------------------------------------------------------------------------------

class ChatFunction(_Model):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(_Model):
    index: Count | None = None  # chunks: which call a delta belongs to
    id: str | None = None
    function: ChatFunction | None = None


class TextPart(_Model):
    text: str | None = None


class _Said(_Model):
    """What a chat answer's message and a chunk's delta share."""

    refusal: str | None = None
    reasoning_content: str | None = None  # vLLM
    reasoning: str | None = None  # OpenRouter, Ollama
    tool_calls: list[ChatToolCall] | None = None

    def reasoning_text(self) -> str | None:
        """Reasoning text under whichever name the server used."""
        return self.reasoning_content or self.reasoning or None


class ChatMessage(_Said):
    content: str | list[TextPart] | None = None  # text parts: some servers, even on the response side

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatDelta(_Said):
    content: str | None = None


class CachedDetails(_Model):
    cached_tokens: Count | None = None


class ReasoningDetails(_Model):
    reasoning_tokens: Count | None = None


class ChatUsage(_Model):
    """Token counts as Chat Completions names them."""

    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    total_tokens: Count | None = None
    prompt_tokens_details: CachedDetails | None = None
    completion_tokens_details: ReasoningDetails | None = None

    def as_responses(self) -> dict[str, Any]:
        """The Responses usage object with the same counts."""
        inp, out = self.prompt_tokens or 0, self.completion_tokens or 0
        cached = self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details else None
        reasoning = self.completion_tokens_details.reasoning_tokens if self.completion_tokens_details else None
        return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached or 0}, "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": reasoning or 0},
                "total_tokens": self.total_tokens or inp + out}


class ResponsesUsage(_Model):
    """Token counts as the Responses API names them."""

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    total_tokens: Count | None = None
    input_tokens_details: CachedDetails | None = None
    output_tokens_details: ReasoningDetails | None = None

    def as_chat(self) -> dict[str, Any]:
        """The chat usage object with the same counts."""
        inp, out = self.input_tokens or 0, self.output_tokens or 0
        cached = self.input_tokens_details.cached_tokens if self.input_tokens_details else None
        reasoning = self.output_tokens_details.reasoning_tokens if self.output_tokens_details else None
        return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": self.total_tokens or inp + out,
                "prompt_tokens_details": {"cached_tokens": cached or 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning or 0}}


class ChatChoice(_Model):
    index: Count | None = None
    message: ChatMessage | None = None
    finish_reason: str | None = None


class ChatCompletion(_Model):
    created: Count | None = None
    model: str | None = None
    choices: list[ChatChoice] | None = None
    usage: ChatUsage | None = None
    service_tier: str | None = None
    error: Any = None  # an error inside a 200 answer: a stream that replays the answer ends with it

    def first_choice(self) -> tuple[str, ChatChoice]:
        """(path, choice) of the first choice: the one with `index` 0 wherever it is listed (streams read
        only that one), else the first listed."""
        if not self.choices:
            raise BadUpstream("choices", "is missing or empty")
        i = next((i for i, c in enumerate(self.choices) if c.index == 0), 0)
        return f"choices[{i}]", self.choices[i]


class ChunkChoice(_Model):
    index: Count | None = None
    delta: ChatDelta | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that ended the turn


class ChatChunk(_Model):
    created: Count | None = None
    model: str | None = None
    choices: list[ChunkChoice] | None = None
    usage: ChatUsage | None = None
    error: Any = None  # a provider's mid-stream error: a string or an object, read leniently


# -- Responses ----------------------------------------------------------------------------------------

Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]


class TopLogprob(_Model):
    token: str
    logprob: int | float  # kept as sent: an integer stays one
    bytes: list[Byte] | None = None


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob] | None = None


class OutputPart(_Model):
    """A message's content part (output_text, refusal), or a reasoning item's summary or content part."""

    type: str | None = None
    text: str | None = None
    refusal: str | None = None
    logprobs: list[Logprob] | None = None


class OutputItem(_Model):
    type: str | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    input: str | None = None
    content: list[OutputPart] | None = None
    summary: list[OutputPart] | None = None

    def reasoning_text(self) -> str:
        """A reasoning item's summary text, else its raw reasoning text."""
        return "".join(p.text or "" for p in (self.summary or self.content or ()))


class IncompleteDetails(_Model):
    reason: str | None = None


class ResponseObject(_Model):
    id: str | None = None
    status: str | None = None
    model: str | None = None
    created_at: Count | None = None
    output: list[OutputItem] | None = None
    usage: ResponsesUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    service_tier: str | None = None
    error: Any = None  # a failed Response's error: read leniently


class EventKind(_Model):
    """A Responses stream event's type, read first: the rest is read by the model of that type, so
    events the translator ignores are never checked."""

    type: str | None = None


class DeltaEvent(_Model):
    delta: str | None = None


class ItemEvent(_Model):
    item: OutputItem | None = None


class ArgumentsEvent(_Model):
    item_id: str | None = None
    delta: str | None = None
    arguments: str | None = None


class ResponseEvent(_Model):
    response: ResponseObject | None = None


# -- decoding ------------------------------------------------------------------------------------

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_ERROR = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TYPES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "null": "null",
          "object": "an object", "array": "a list"}


def decode(raw: bytes | str, model: type[M], what: str) -> M:
    """`raw` JSON as `model`; `what` names the whole document in errors (`stream event`, `body`)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = msgspec.json.Decoder(model)
    try:
        out: M = decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise _bad(e, what) from None
    except msgspec.DecodeError:
        raise BadUpstream(what, "is not JSON") from None
    return out


def convert(doc: Any, model: type[M], what: str, where: str = "") -> M:
    """An already decoded JSON document (found at the path `where` of a larger one) as `model`."""
    try:
        return msgspec.convert(doc, model)
    except msgspec.ValidationError as e:
        raise _bad(e, what, where) from None


def _bad(e: msgspec.ValidationError, what: str, where: str = "") -> BadUpstream:
    """msgspec's `Expected `str | null`, got `int` - at `$.choices[0].delta.content`` as today's
    `'choices[0].delta.content' is an integer, expected a string`."""
    found = _ERROR.match(str(e))
    problem, path = (found["problem"], found["path"]) if found else (str(e), None)
    field = (where + (path or "") if where else (path or "").removeprefix(".")) or what
    got = re.fullmatch(r"Expected `(.+?)`, got `(\w+)`", problem)
    if got:
        expected = " or ".join(_TYPES.get(t, t) for t in got[1].split(" | ") if t != "null")
        return BadUpstream(field, f"is {_TYPES.get(got[2], got[2])}, expected {expected}")
    if re.fullmatch(r"Expected `int` >= 0", problem):
        return BadUpstream(field, "is negative, expected a non-negative integer")
    if (missing := re.fullmatch(r"Object missing required field `(\w+)`", problem)) is not None:
        return BadUpstream(f"{field}.{missing[1]}" if path else missing[1], "is missing")
    return BadUpstream(field, problem[:1].lower() + problem[1:])
