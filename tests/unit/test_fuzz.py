"""Property tests (hypothesis): every input, from a client or an upstream, ends in an answer the other
side accepts or in a well-formed error; never another exception.

Upstream answers are generated as realistic structures (chat completions and chunks, Responses
objects and events), then half the time broken at one random place: a value of a wrong type or a
missing part, at any level. A valid answer must translate to a schema-valid one carrying the same
content; a broken one may do that too, or fail with `BadUpstream` (buffered) or the stream's error
and terminal events (streamed).

HYPOTHESIS_PROFILE=long runs many more cases (scripts/fuzz.sh).
"""

from __future__ import annotations

import copy
import json
import os
from functools import reduce
from operator import getitem
from typing import Any

import jsonschema
import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extproc.config import parse_config
from extproc.errors import BadUpstream, GatewayError
from extproc.exchange import Exchange
from extproc.exchange.body import MAX_DEPTH, parse_body
from extproc.routing.gateway import Gateway
from extproc.translate import (
    req_chat_to_responses,
    req_responses_to_chat,
    resp_chat_to_responses,
    resp_responses_to_chat,
)
from extproc.translate.sse import SSEDecoder, encode
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from extproc.translate.stream_responses_to_chat import ResponsesToChatStream
from tests.conformance import check_stream, sse_events, validate, validate_response

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

text = st.text(max_size=20)
name = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10)
count = st.integers(0, 2**31)
json_scalar = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False,
                                                                                     allow_infinity=False) | text
junk = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                    max_leaves=8)

# -- what the client side may receive: independent of the code under test -----------------------------

_INT = {"type": "integer", "minimum": 0}
_STR_OR_NULL = {"type": ["string", "null"]}
_CHAT_USAGE = {"type": ["object", "null"], "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
               "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                              "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _INT}},
                              "completion_tokens_details": {"type": "object",
                                                            "properties": {"reasoning_tokens": _INT}}}}
_TOOL_CALL = {"type": "object", "required": ["id", "type"], "properties": {
    "id": {"type": "string"}, "type": {"enum": ["function", "custom"]},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}},
    "custom": {"type": "object", "required": ["name", "input"],
               "properties": {"name": {"type": "string"}, "input": {"type": "string"}}}}}
CHAT_COMPLETION = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": _INT, "model": {"type": "string"},
        "usage": _CHAT_USAGE, "service_tier": _STR_OR_NULL,
        "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"const": 0},
                "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter"]},
                "logprobs": {"type": ["object", "null"]},
                "message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"const": "assistant"}, "content": _STR_OR_NULL, "refusal": _STR_OR_NULL,
                    "reasoning_content": {"type": "string"},
                    "tool_calls": {"type": "array", "minItems": 1, "items": _TOOL_CALL}}}}}}}}
CHAT_CHUNK = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": _INT,
        "model": {"type": "string"}, "usage": _CHAT_USAGE,
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "delta", "finish_reason"],
            "properties": {
                "index": {"const": 0},
                "finish_reason": {"enum": [None, "stop", "length", "tool_calls", "content_filter"]},
                "delta": {"type": "object", "properties": {
                    "role": {"const": "assistant"}, "content": {"type": "string"}, "refusal": {"type": "string"},
                    "reasoning_content": {"type": "string"},
                    "tool_calls": {"type": "array", "items": {"type": "object", "required": ["index"],
                                                              "properties": {"index": _INT}}}}}}}}}}
CHAT_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "code": {"type": "string"}}}}}
# Fields the Chat Completions API defines (OpenAI's reference), for translated requests.
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "reasoning_effort",
    "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity", "modalities",
}


def check(schema: dict[str, Any], doc: Any) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)


def is_bad_upstream(e: GatewayError) -> bool:
    """A well-formed upstream fault: 502, its code, and the JSON path of the field in the message."""
    return isinstance(e, BadUpstream) and e.status == 502 and e.code == "bad_upstream_response" \
        and f"'{e.field}'" in e.message and json.loads(e.body())["error"]["type"] == "server_error"


# -- breaking a valid structure at one place ---------------------------------------------------------

def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        out += _paths(value, (*prefix, key))
    return out


@st.composite
def broken(draw: st.DrawFn, doc: Any) -> tuple[Any, bool]:
    """(doc, broken?): half the time the doc as it is, else one value replaced by junk or removed."""
    if draw(st.booleans()):
        return doc, False
    doc = copy.deepcopy(doc)
    path = draw(st.sampled_from(_paths(doc)))
    parent = reduce(getitem, path[:-1], doc)
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(junk)
    return doc, True


def wire(doc: Any) -> Any:
    """What the sidecar sees of an upstream's JSON: written by some server, read by orjson."""
    return orjson.loads(json.dumps(doc))


# -- realistic upstream answers ----------------------------------------------------------------------

@st.composite
def chat_turn(draw: st.DrawFn) -> dict[str, Any]:
    """What a chat model says in one turn, as plain facts both shapes are generated from."""
    calls = draw(st.lists(st.tuples(name, text), max_size=3))
    return {"text": draw(st.none() | text), "reasoning": draw(st.none() | text.filter(bool)), "calls": calls,
            "refusal": draw(st.none() | text.filter(bool)) if not calls else None,
            "finish": "tool_calls" if calls else draw(st.sampled_from(["stop", "length", "content_filter"])),
            "usage": draw(st.none() | st.tuples(count, count, count, count)), "created": draw(count)}


def _chat_usage(u: tuple[int, int, int, int]) -> dict[str, Any]:
    return {"prompt_tokens": u[0], "completion_tokens": u[1], "total_tokens": u[0] + u[1],
            "prompt_tokens_details": {"cached_tokens": u[2]}, "completion_tokens_details": {"reasoning_tokens": u[3]}}


def chat_completion(turn: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": turn["text"], "refusal": turn["refusal"]}
    if turn["reasoning"]:
        message["reasoning_content"] = turn["reasoning"]
    if turn["calls"]:
        message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, (n, a) in enumerate(turn["calls"])]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": turn["created"], "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": turn["finish"], "logprobs": None}],
            "usage": _chat_usage(turn["usage"]) if turn["usage"] else None}


def chat_chunks(turn: dict[str, Any]) -> list[Any]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": turn["created"], "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in _split(turn["reasoning"])]
    out += [chunk({"content": p}) for p in _split(turn["text"])]
    out += [chunk({"refusal": p}) for p in _split(turn["refusal"])]
    for i, (n, args) in enumerate(turn["calls"]):
        out.append(chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                          "function": {"name": n, "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in _split(args)]
    out.append(chunk({}, turn["finish"]))
    if turn["usage"]:
        out.append({**base, "choices": [], "usage": _chat_usage(turn["usage"])})
    return out


def _split(s: str | None) -> list[str]:
    return [s[i:i + 4] for i in range(0, len(s), 4)] if s else []


def response_object(turn: dict[str, Any]) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    status = "incomplete" if turn["finish"] in ("length", "content_filter") else "completed"
    if turn["reasoning"]:
        output.append({"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": turn["reasoning"]}]})
    content = [{"type": "output_text", "text": turn["text"], "annotations": [], "logprobs": []}] if turn["text"] else []
    if turn["refusal"]:
        content.append({"type": "refusal", "refusal": turn["refusal"]})
    if content:
        output.append({"type": "message", "id": "msg_1", "role": "assistant", "status": status, "content": content})
    output += [{"type": "function_call", "id": f"fc_{i}", "call_id": f"call_{i}", "name": n, "arguments": a,
                "status": "completed"} for i, (n, a) in enumerate(turn["calls"])]
    u = turn["usage"]
    return {"id": "resp_1", "object": "response", "created_at": turn["created"], "status": status, "model": "m",
            "output": output, "incomplete_details": {"reason": "max_output_tokens" if turn["finish"] == "length"
                                                     else "content_filter"} if status == "incomplete" else None,
            "usage": {"input_tokens": u[0], "output_tokens": u[1], "total_tokens": u[0] + u[1],
                      "input_tokens_details": {"cached_tokens": u[2]},
                      "output_tokens_details": {"reasoning_tokens": u[3]}} if u else None}


def response_events(turn: dict[str, Any]) -> list[Any]:
    resp = response_object(turn)
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {**resp, "status": "in_progress",
                                                                              "output": [], "usage": None}}]
    for idx, item in enumerate(resp["output"]):
        base = {"item_id": item["id"], "output_index": idx}
        if item["type"] == "reasoning":
            events.append({"type": "response.output_item.added", "output_index": idx, "item": {**item, "summary": []}})
            events += [{"type": "response.reasoning_summary_text.delta", **base, "summary_index": 0, "delta": p}
                       for p in _split(turn["reasoning"])]
        elif item["type"] == "message":
            events.append({"type": "response.output_item.added", "output_index": idx, "item": {**item, "content": []}})
            for ci, part in enumerate(item["content"]):
                kind = "output_text" if part["type"] == "output_text" else "refusal"
                events += [{"type": f"response.{kind}.delta", **base, "content_index": ci, "delta": p}
                           for p in _split(part.get("text", part.get("refusal")))]
        else:
            events.append({"type": "response.output_item.added", "output_index": idx, "item": {**item, "arguments": ""}})
            events += [{"type": "response.function_call_arguments.delta", **base, "delta": p}
                       for p in _split(item["arguments"])]
            events.append({"type": "response.function_call_arguments.done", **base, "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": idx, "item": item})
    events.append({"type": "response.completed" if resp["status"] == "completed" else "response.incomplete",
                   "response": resp})
    return [{**ev, "sequence_number": i} for i, ev in enumerate(events)]


@st.composite
def broken_stream(draw: st.DrawFn, make: Any) -> tuple[dict[str, Any], list[Any], bool]:
    """(turn, events, broken?): one event of the stream broken, half the time."""
    turn = draw(chat_turn())
    events = make(turn)
    i = draw(st.integers(0, len(events) - 1))
    events[i], was_broken = draw(broken(events[i]))
    return turn, events, was_broken


def sse(events: list[Any], done: bool) -> bytes:
    return b"".join(encode(json.dumps(ev).encode()) for ev in events) + (b"data: [DONE]\n\n" if done else b"")


def pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


# -- upstream answers, buffered --------------------------------------------------------------------

@given(chat_turn().flatmap(lambda turn: st.tuples(st.just(turn), broken(chat_completion(turn)))))
def test_any_chat_answer_becomes_a_valid_response_or_a_502(case):
    turn, (doc, was_broken) = case
    try:
        out = resp_chat_to_responses.translate_response(wire(doc), {"model": "m"}, "resp_x")
    except GatewayError as e:
        assert was_broken and is_bad_upstream(e), e
        event("502 bad_upstream_response")
        return
    event("translated, broken" if was_broken else "translated")
    validate_response(out)
    orjson.dumps(out)
    if was_broken:
        return
    kinds = [o["type"] for o in out["output"]]
    texts = [p.get("text", "") for o in out["output"] if o["type"] == "message" for p in o["content"]]
    assert "".join(texts) == (turn["text"] or "")
    assert [(o["name"], o["arguments"]) for o in out["output"] if o["type"] == "function_call"] == turn["calls"]
    assert ("reasoning" in kinds) == bool(turn["reasoning"])
    assert out["status"] == ("completed" if turn["finish"] in ("stop", "tool_calls") else "incomplete")
    assert (out["usage"] or {}).get("input_tokens") == (turn["usage"][0] if turn["usage"] else None)


@given(chat_turn().flatmap(lambda turn: st.tuples(st.just(turn), broken(response_object(turn)))))
def test_any_responses_answer_becomes_a_valid_chat_completion_or_a_502(case):
    turn, (doc, was_broken) = case
    try:
        out = resp_responses_to_chat.translate_response(wire(doc), "m")
    except GatewayError as e:
        assert was_broken and is_bad_upstream(e), e
        event("502 bad_upstream_response")
        return
    event("translated, broken" if was_broken else "translated")
    check(CHAT_COMPLETION, out)
    orjson.dumps(out)
    if was_broken:
        return
    message = out["choices"][0]["message"]
    assert (message["content"] or "") == (turn["text"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])] == turn["calls"]
    assert message.get("reasoning_content") == turn["reasoning"]
    assert out["choices"][0]["finish_reason"] == turn["finish"]
    assert out["usage"] == (_chat_usage(turn["usage"]) if turn["usage"] else None)


@given(junk)
def test_any_json_from_an_upstream_translates_or_is_a_502(doc):
    doc = wire({"choices": doc, "output": doc} if not isinstance(doc, dict) else doc)
    for translate in (lambda d: resp_chat_to_responses.translate_response(d, {"model": "m"}),
                      lambda d: resp_responses_to_chat.translate_response(d, "m")):
        try:
            orjson.dumps(translate(doc))
        except GatewayError as e:
            assert is_bad_upstream(e), e


# -- upstream answers, streamed -----------------------------------------------------------------------

def _text_of_events(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@given(broken_stream(chat_chunks), st.booleans(), st.lists(st.integers(0, 10_000), max_size=6))
def test_any_chat_stream_becomes_a_valid_responses_stream(case, done, cuts):
    turn, chunks, was_broken = case
    t = ChatToResponsesStream({"model": "m"}, "resp_x")
    out = b"".join(t.feed(p) for p in pieces(sse(chunks, done), cuts)) + t.close()
    events = sse_events(out)
    final = check_stream(events)  # schemas, sequence numbers, item lifecycles, one terminal event, last
    event(f"{final['status']}, {'broken' if was_broken else 'valid'} upstream stream")
    if final["status"] == "failed":
        assert events[-2]["type"] == "error" and isinstance(events[-2]["error"]["code"], str)
    if not was_broken:
        assert final["status"] != "failed"
        assert _text_of_events(events) == (turn["text"] or "")
        calls = [(o["name"], o["arguments"]) for o in final["output"] if o["type"] == "function_call"]
        assert calls == turn["calls"]


@given(broken_stream(response_events), st.lists(st.integers(0, 10_000), max_size=6))
def test_any_responses_stream_becomes_a_valid_chat_stream(case, cuts):
    turn, events, was_broken = case
    t = ResponsesToChatStream({"model": "m"}, "m")
    out = b"".join(t.feed(p) for p in pieces(sse(events, False), cuts)) + t.close()
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"data: [DONE]") == 1
    decoder = SSEDecoder()
    chunks = [json.loads(e.data) for e in decoder.feed(out) + decoder.close() if e.data != "[DONE]"]
    for chunk in chunks[:-1]:
        check(CHAT_CHUNK, chunk)
    check(CHAT_ERROR if "error" in chunks[-1] else CHAT_CHUNK, chunks[-1])
    event(f"{'error chunk' if 'error' in chunks[-1] else 'finished'}, {'broken' if was_broken else 'valid'} upstream")
    if not was_broken:
        assert "error" not in chunks[-1]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content", "") for d in deltas) == (turn["text"] or "")
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == turn["finish"]


@given(st.lists(st.text(max_size=12), min_size=1, max_size=8), st.lists(st.integers(0, 5000), max_size=6))
def test_stream_translation_does_not_depend_on_chunking(deltas, cuts):
    turn = {"text": "".join(deltas), "reasoning": None, "calls": [("f", '{"a": 1}')], "refusal": None,
            "finish": "tool_calls", "usage": (1, 2, 0, 0), "created": 1}
    raw = sse(chat_chunks(turn), True)
    one, many = ChatToResponsesStream({"model": "m"}, "resp_x"), ChatToResponsesStream({"model": "m"}, "resp_x")
    whole = sse_events(one.feed(raw) + one.close())
    split = sse_events(b"".join(many.feed(p) for p in pieces(raw, cuts)) + many.close())

    def shape(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["type"], e["sequence_number"], e.get("output_index"), e.get("delta")) for e in events]

    assert shape(whole) == shape(split)
    assert _text_of_events(whole) == turn["text"]


line = st.text(max_size=40).map(lambda t: t.replace("\n", " ").replace("\r", " "))  # bytes split only there


@given(st.lists(st.tuples(st.none() | st.sampled_from(["message", "ping"]), line), max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
def test_sse_events_do_not_depend_on_chunking(events, cuts, crlf):
    raw = b"".join(encode(data.encode(), name) for name, data in events)  # data: one line, as encode() takes
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    whole, split = SSEDecoder(), SSEDecoder()
    expected = whole.feed(raw) + whole.close()
    got = [ev for piece in pieces(raw, cuts) for ev in split.feed(piece)] + split.close()
    assert got == expected
    assert [e.data for e in expected] == [d for _, d in events]


# -- client requests ----------------------------------------------------------------------------------

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
part = text_part | st.fixed_dictionaries({"type": st.just("image_url"),
                                          "image_url": st.fixed_dictionaries({"url": st.just("https://x/y.png")})})
content = text | st.lists(part, min_size=1, max_size=3)  # images only from the user, as the API allows
call = st.fixed_dictionaries({"id": name, "type": st.just("function"),
                              "function": st.fixed_dictionaries({"name": name, "arguments": text})})


@st.composite
def chat_request(draw: st.DrawFn) -> dict[str, Any]:
    first = draw(st.sampled_from(["system", "developer", "user"]))
    messages = [{"role": first, "content": draw(content if first == "user" else text | st.lists(text_part, min_size=1,
                                                                                                 max_size=2))}]
    for _ in range(draw(st.integers(0, 4))):
        calls = draw(st.lists(call, max_size=2, unique_by=lambda c: c["id"]))
        messages.append({"role": "assistant", "content": draw(st.none() | text), **({"tool_calls": calls} if calls else {})})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls]
        messages.append({"role": "user", "content": draw(content)})
    body = {"model": "m", "messages": messages}
    optional = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(16, 10**6),
                "stream": st.booleans(), "user": text, "tool_choice": st.sampled_from(["auto", "none", "required"]),
                "reasoning_effort": st.sampled_from(["low", "medium", "high"]), "parallel_tool_calls": st.booleans(),
                "response_format": st.just({"type": "json_object"}), "metadata": st.dictionaries(name, text, max_size=2)}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@st.composite
def responses_request(draw: st.DrawFn) -> dict[str, Any]:
    items: list = [{"type": "message", "role": draw(st.sampled_from(["user", "developer", "system"])),
                    "content": draw(text | st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": text}),
                                                    min_size=1, max_size=2))}]
    for i in range(draw(st.integers(0, 3))):
        cid = f"c{i}"
        kind = draw(st.sampled_from(["function_call", "custom_tool_call"]))
        items.append({"type": kind, "call_id": cid, "name": "f" if kind == "function_call" else "g",
                      **({"arguments": draw(text)} if kind == "function_call" else {"input": draw(text)})})
        items.append({"type": f"{kind}_output", "call_id": cid, "output": draw(text)})
        if draw(st.booleans()):
            items.append({"type": "reasoning", "summary": [{"type": "summary_text", "text": draw(text)}]})
    body = {"model": "m", "input": draw(text.filter(bool)) if draw(st.booleans()) else items,
            "tools": [{"type": "function", "name": "f", "description": "does f", "parameters": {"type": "object"}},
                      {"type": "custom", "name": "g", "format": {"type": "text"}}, {"type": "web_search"}]}
    optional = {"instructions": text, "max_output_tokens": st.integers(1, 10**6), "stream": st.booleans(),
                "store": st.booleans(), "temperature": st.floats(0, 2), "reasoning": st.just({"effort": "low"}),
                "text": st.just({"format": {"type": "json_object"}}), "tool_choice": st.sampled_from(["auto", "required"])}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@given(chat_request())
def test_any_valid_chat_request_becomes_a_valid_responses_request(body):
    try:
        out = req_chat_to_responses.translate_request(body)
    except GatewayError as e:
        assert e.status == 400 and e.param  # a clear refusal that names the field
        return
    if "response_format" in body:  # OpenAI takes json_object here; this spec version's request schema lacks it
        assert out.pop("text")["format"] == body["response_format"]
    validate("CreateResponseBody", out)


@given(responses_request())
def test_any_valid_responses_request_becomes_a_valid_chat_request(body):
    out = req_responses_to_chat.translate_request(body)
    assert set(out) <= CHAT_FIELDS
    ids = set()
    for m in out["messages"]:  # every tool message answers a call made before it
        assert m["role"] in ("system", "developer", "user", "assistant", "tool")
        ids |= {c["id"] for c in m.get("tool_calls") or ()}
        assert m["role"] != "tool" or m["tool_call_id"] in ids
    assert out["messages"][-1]["role"] != "assistant" or isinstance(body["input"], list)


@given(st.dictionaries(st.sampled_from(["model", "messages", "input", "tools", "tool_choice", "max_tokens", "stream",
                                        "instructions", "text", "response_format", "max_output_tokens", "reasoning"]),
                       junk, max_size=6))
def test_junk_is_refused_clearly_never_a_crash(body):
    body.setdefault("model", "m")
    for translate in (req_chat_to_responses.translate_request, req_responses_to_chat.translate_request):
        try:
            orjson.dumps(translate(body))
        except GatewayError as e:
            assert 400 <= e.status < 500 and e.param


def _escaped(key: str) -> str:
    """The same key spelt with every character as a \\u escape: one key to any JSON parser."""
    return "".join(f"\\u{ord(c):04x}" for c in key)


@given(st.dictionaries(name, json_scalar, min_size=1, max_size=5), st.data())
def test_a_repeated_top_level_key_is_refused_however_it_is_spelt(body, data):
    key = data.draw(st.sampled_from(sorted(body)))
    raw = json.dumps(body).encode()
    spelt = data.draw(st.sampled_from([json.dumps(key), '"' + _escaped(key) + '"']))
    repeated = raw[:-1] + b", " + spelt.encode() + b": " + json.dumps(data.draw(json_scalar)).encode() + b"}"
    assert parse_body(raw) == body
    try:
        parse_body(repeated)
    except GatewayError as e:
        assert (e.status, e.code, e.param) == (400, "duplicate_key", key)
    else:
        raise AssertionError("a repeated key was accepted")


@given(st.integers(1, 400), st.sampled_from(["[", '{"k":']), st.booleans())
def test_nesting_is_limited_while_parsing(depth, opener, repeat_key):
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    raw = ('{"model": "m", ' + ('"model": "n", ' if repeat_key else "") + '"metadata": ' + nested + "}").encode()
    try:
        body = parse_body(raw)
    except GatewayError as e:
        assert e.status == 400
        if depth + 1 > MAX_DEPTH:
            assert e.code == "invalid_json" and str(MAX_DEPTH) in e.message
        else:
            assert repeat_key and e.code == "duplicate_key"
        return
    assert depth + 1 <= MAX_DEPTH and not repeat_key
    orjson.dumps({"a": {"b": {"c": {"d": {"e": {"f": [body]}}}}}})  # room left for what translation adds


@given(st.binary(max_size=200) | junk.map(lambda j: json.dumps(j).encode()))
def test_any_bytes_parse_to_an_object_or_a_400(raw):
    try:
        body = parse_body(raw)
    except GatewayError as e:
        assert e.status == 400 and e.code in ("invalid_json", "duplicate_key")
        return
    assert isinstance(body, dict)


_ONLY = "backends: [{name: only, api: %s, translate: true, models: ['*'], endpoints: ['127.0.0.1:9']}]"
GATEWAYS = {"chat": Gateway(parse_config(_ONLY % "chat", env={})),  # a Responses client's request is translated
            "responses": Gateway(parse_config(_ONLY % "responses", env={}))}  # and a chat client's


@given(st.one_of(responses_request().flatmap(lambda b: st.tuples(st.just("/v1/responses"), broken(b))),
                 chat_request().flatmap(lambda b: st.tuples(st.just("/v1/chat/completions"), broken(b)))))
def test_a_request_broken_anywhere_is_routed_or_refused_naming_the_field(case):
    """The whole request side (records, tools, translation), not only the translators: a realistic
    request with one value of a wrong type or one part missing is translated or refused with a 4xx;
    never an exception, and never the net for shapes nothing checked (a 400 `invalid_request`)."""
    path, (body, was_broken) = case
    ex = Exchange(GATEWAYS["chat" if path == "/v1/responses" else "responses"])
    ex.request_headers({":method": "POST", ":path": path, "content-type": "application/json"}, False)
    try:
        act = ex.request_body(json.dumps(body).encode())
    except GatewayError as e:
        event(f"refused: {e.code}")
        assert was_broken, e.message  # a valid request is never refused
        assert 400 <= e.status < 500 and e.code != "invalid_request", e.message
        return
    event("translated")
    assert act.immediate is None and act.body is not None
    sent = orjson.loads(act.body)
    assert sent["model"] == body["model"] and ("messages" in sent) is (path == "/v1/responses")
