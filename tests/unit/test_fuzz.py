"""Property tests (hypothesis): translators never fail with anything but a clear GatewayError, what
they produce is what the target API accepts, and SSE decoding does not depend on chunking.

HYPOTHESIS_PROFILE=long runs many more cases (scripts/fuzz.sh)."""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.errors import GatewayError
from extproc.translate import req_chat_to_responses, req_responses_to_chat, resp_chat_to_responses
from extproc.translate.sse import SSEDecoder, encode
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream
from tests.upstreams import CHAT_FIELDS, RESPONSES_FIELDS

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

text = st.text(max_size=30)
json_scalar = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | text
junk = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                    max_leaves=12)
part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                 st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}))
content = text | st.lists(part, min_size=1, max_size=3)
call = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8), "type": st.just("function"),
                              "function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=10),
                                                                 "arguments": text})})


@st.composite
def chat_request(draw) -> dict:
    messages = [{"role": draw(st.sampled_from(["system", "developer", "user"])), "content": draw(content)}]
    for _ in range(draw(st.integers(0, 4))):
        calls = draw(st.lists(call, max_size=2, unique_by=lambda c: c["id"]))
        messages.append({"role": "assistant", "content": draw(st.none() | text), **({"tool_calls": calls} if calls else {})})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls]
        messages.append({"role": "user", "content": draw(content)})
    body = {"model": "m", "messages": messages}
    optional = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(1, 10**6),
                "stream": st.booleans(), "user": text, "tool_choice": st.sampled_from(["auto", "none", "required"]),
                "reasoning_effort": st.sampled_from(["low", "medium", "high"]), "parallel_tool_calls": st.booleans(),
                "response_format": st.just({"type": "json_object"}), "n": st.integers(1, 3), "metadata": st.dictionaries(text, text, max_size=2)}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@st.composite
def responses_request(draw) -> dict:
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
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}, {"type": "custom", "name": "g"},
                      {"type": "web_search"}]}
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
    assert set(out) <= RESPONSES_FIELDS


@given(responses_request())
def test_any_valid_responses_request_becomes_a_valid_chat_request(body):
    out = req_responses_to_chat.translate_request(body)
    assert set(out) <= CHAT_FIELDS
    ids = set()
    for m in out["messages"]:  # every tool message answers a call made before it
        ids |= {c["id"] for c in m.get("tool_calls") or ()}
        assert m["role"] != "tool" or m["tool_call_id"] in ids


@given(st.dictionaries(st.sampled_from(["model", "messages", "input", "tools", "tool_choice", "max_tokens", "stream",
                                        "instructions", "text", "response_format", "max_output_tokens", "reasoning"]),
                       junk, max_size=6))
def test_junk_is_refused_clearly_never_a_crash(body):
    body.setdefault("model", "m")
    for translate in (req_chat_to_responses.translate_request, req_responses_to_chat.translate_request):
        try:
            translate(body)
        except GatewayError as e:
            assert 400 <= e.status < 500


@given(junk)
def test_any_upstream_chat_answer_translates_or_fails_clearly(doc):
    if isinstance(doc, dict):
        with contextlib.suppress(GatewayError):
            resp_chat_to_responses.translate_response(doc, {"model": "m"})


line = st.text(max_size=40).map(lambda t: t.replace("\n", " ").replace("\r", " "))  # bytes split only there


@given(st.lists(st.tuples(st.none() | st.sampled_from(["message", "ping"]), line), max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
def test_sse_events_do_not_depend_on_chunking(events, cuts, crlf):
    raw = b"".join(encode(data.encode(), name) for name, data in events)  # data: one line, as encode() takes
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    whole, split = SSEDecoder(), SSEDecoder()
    expected = whole.feed(raw) + whole.close()
    got = [ev for piece in pieces for ev in split.feed(piece)] + split.close()
    assert got == expected
    assert [e.data for e in expected] == [d for _, d in events]


@given(st.lists(st.text(max_size=12), min_size=1, max_size=8), st.lists(st.integers(0, 5000), max_size=6))
def test_stream_translation_does_not_depend_on_chunking(deltas, cuts):
    import json

    base = {"id": "c", "created": 1, "model": "m"}
    raw = b"".join(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]}).encode()
                   + b"\n\n" for d in deltas)
    raw += b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
    raw += b"\n\ndata: [DONE]\n\n"
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    one, many = ChatToResponsesStream({"model": "m"}, "resp_x"), ChatToResponsesStream({"model": "m"}, "resp_x")
    a = one.feed(raw) + one.close()
    b = b"".join(many.feed(p) for p in pieces) + many.close()
    strip = SSEDecoder()
    texts = [json.loads(e.data).get("delta") for e in strip.feed(a) if "output_text.delta" in e.data]
    assert "".join(t for t in texts if t) == "".join(deltas)
    assert len(a) == len(b)
