"""Every kind of model x every combination of the facts Envoy sees, through both the real processor (the
`Exchange`, in-process) and Envoy's compiled routes: both take the same path, and the processor does
exactly what `routing.needs.needs` says (no more, no less).

What the processor did is read from its behaviour, not from its plan: the routing headers it set (the
backend, the API key, the first-contact mark), whether it translated, the store keys it read (the
conversation), and, fed the answer a real upstream would send, the store writes it made (the answer's
id pinned, a turn kept, the conversation the sidecar holds extended) and the usage it counted (reported or estimated). The honoured mode header is
seen as a changed decision: the same request without it goes elsewhere. Envoy's side is the compiled
route table read the way Envoy reads it (`first_match`, tests/unit/test_compile.py), with the metadata
json_to_metadata would write from the same body (its rules: envoy/names.py, checked against
deploy/envoy.yaml in test_envoy_names.py).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest

from extproc.api import CHAT, MESSAGES, PATHS, RESPONSES, other
from extproc.config import parse_config
from extproc.envoy.names import H_BACKEND, H_FIRST_CONTACT, MODE_HEADER, REQUEST_FIELDS
from extproc.errors import GatewayError
from extproc.exchange import Exchange, Lookup
from extproc.routing.classify import Classifier
from extproc.routing.compile import compile_routes
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge, Learned, learned_key
from extproc.routing.needs import Call, Facts, Need, is_fast, needs
from extproc.state.conversations import Record, conversation_key
from extproc.state.tenancy import ANONYMOUS

from .test_compile import first_match

CONFIG = """
backends:
  - name: chatty
    api: chat
    models: ["llama-*", "nt-*"]
    endpoints: ["10.0.0.1:8000", "10.0.0.2:8000"]
  - name: codex
    api: responses
    models: ["resp-*"]
    endpoints: ["10.0.0.4:8000"]
  - name: keyed
    api: chat
    models: ["keyed-*"]
    endpoints: ["10.0.0.3:8000"]
    api_key_env: KEY
  - name: unset
    api: chat
    models: ["unset-*"]
    endpoints: ["10.0.0.6:8000"]
    api_key_env: NOT_SET
  - name: hosted
    api: both
    models: ["gpt-4o*"]
    cluster: openai
  - name: open
    api: auto
    models: ["open-*"]
    endpoints: ["10.0.0.5:8000"]
    path_prefix: /openai
  - name: azure
    api: chat
    models: ["az-*"]
    url: https://res.openai.azure.com
    provider: azure
    api_version: "2024-10-21"
    api_key_env: KEY
  - name: hostkey
    api: chat
    models: ["hk-*"]
    url: https://api.provider.example
    api_key_env: KEY
  - name: anth
    api: messages
    models: ["anth-*"]
    endpoints: ["10.0.0.7:8000"]
  - name: anthkey
    api: messages
    models: ["ak-*"]
    endpoints: ["10.0.0.8:8000"]
    api_key_env: KEY
model_rules:
  - match: "nt-*"
    mode: responses
    translate: false
"""
# One model of each kind: chat, Responses, keyed, unserved, both APIs, learning, learned ok, learned
# "needs Responses", the catalogue's Responses model on an auto backend, translation off, no backend, Azure's
# versioned shape, a keyed url: backend (Envoy holds its key), a Messages backend, a keyed one.
MODELS = ["llama-3", "resp-1", "keyed-1", "unset-1", "gpt-4o", "open-new", "open-ok", "open-resp", "open-codex-1",
          "nt-1", "nobody", "az-1", "hk-1", "anth-1", "ak-1"]
APIS = tuple(PATHS)  # every client API: Chat, Responses, Messages
LEARNED = {("open", "open-ok"): Learned(None, {CHAT}), ("open", "open-resp"): Learned(RESPONSES)}
CONFIGS = {
    "usage all, mode header honoured": "usage_accounting: all\ndiscovery: {allow_mode_header: true}\n",
    "usage translated": "usage_accounting: translated\n",
    "fast path off": "fast_path: false\n",
}
PREVIOUS, UPSTREAM_ID = "resp_prev1", "resp_up1"
CONVERSATION = conversation_key(ANONYMOUS, "conv_1")  # the sidecar's record of the conversation requests name


def request(api: str, model: str, facts: dict[str, bool], mode: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of a request with these facts, written as a client writes them."""
    body: dict[str, Any] = {"model": model}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if api != RESPONSES else {"input": "hi"})
    if api == MESSAGES:
        body["max_tokens"] = 16
    if facts["stream"]:
        body["stream"] = True
    if facts["include_usage"]:
        body["stream_options"] = {"include_usage": True}
    if not facts["stored"]:
        body["store"] = False
    if facts["previous_response_id"]:
        body["previous_response_id"] = PREVIOUS
    if facts["conversation"]:
        body["conversation"] = "conv_1"
    headers = {"content-encoding": "gzip"} if facts["content_encoding"] else {}
    if mode is not None:
        headers[MODE_HEADER] = mode
    return body, headers


def metadata(body: dict[str, Any]) -> dict[str, Any]:
    """What json_to_metadata writes for this body."""
    out = {}
    for path, key in REQUEST_FIELDS:
        value: Any = body
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, dict):
            out[key] = value
    return out


def upstream_answer(api: str, sent: dict[str, Any]) -> tuple[str, bytes]:
    """(content-type, body) as a real upstream of `api` answers the request it got: a chat stream
    carries usage only when stream_options.include_usage asked for it; Responses always report it."""
    stream = sent.get("stream") is True
    if api == MESSAGES:  # Anthropic reports usage in every answer, streamed or not
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": sent["model"],
                   "content": [{"type": "text", "text": "yo"}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 3, "output_tokens": 2}}
        if not stream:
            return "application/json", json.dumps(message).encode()
        stream_events = [
            {"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                  "usage": {"input_tokens": 3, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "yo"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 2}},
            {"type": "message_stop"}]
        return "text/event-stream", b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                                             for e in stream_events)
    if api == CHAT:
        if not stream:
            return "application/json", json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": sent["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": sent["model"]}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "yo"}}]},
                  {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if (sent.get("stream_options") or {}).get("include_usage") is True:
            events.append({**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                             "total_tokens": 5}})
        return "text/event-stream", b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
            b"data: [DONE]\n\n"
    response = {"id": UPSTREAM_ID, "object": "response", "created_at": 1, "status": "completed",
                "model": sent["model"], "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                                                    "status": "completed", "content": [
                                                        {"type": "output_text", "text": "yo", "annotations": []}]}],
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}
    if not stream:
        return "application/json", json.dumps(response).encode()
    events = [{"type": "response.created", "sequence_number": 0,
               "response": {**response, "status": "in_progress", "output": [], "usage": None}},
              {"type": "response.completed", "sequence_number": 1, "response": response}]
    return "text/event-stream", b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@dataclass(frozen=True)
class Seen:
    """What the processor did with one request."""

    needs: frozenset[Need]  # as shown by its behaviour
    refused: tuple[int, str | None] | None = None  # (status, code) when it answered itself
    backend: str | None = None
    translated: bool = False


# The processor's own answers, by (status, code), and the need each shows.
REFUSALS = {(415, "unsupported_content_encoding"): Need.COMPRESSED, (404, "model_not_found"): Need.NO_BACKEND,
            (400, "unsupported_api"): Need.UNSUPPORTED_API, (503, "backend_unconfigured"): Need.UNAVAILABLE}


def process(gw: Gateway, store: dict[str, bytes], api: str, body: dict[str, Any], headers: dict[str, str]) -> Seen:
    ex = Exchange(gw)
    asked: list[str] = []

    def run(step: Any) -> Any:
        while isinstance(step, Lookup):
            asked.extend(step.keys)
            step = step.then([store.get(k) for k in step.keys])
        return step

    try:
        run(ex.request_headers({":method": "POST", ":path": PATHS[api], "content-type": "application/json",
                                **headers}, False))
        act = run(ex.request_body(json.dumps(body).encode()))
    except GatewayError as e:
        code = e.code
        return Seen(frozenset({REFUSALS[(e.status, code)]}) if (e.status, code) in REFUSALS else frozenset(),
                    (e.status, code), translated=ex.translated)
    set_headers = dict(act.set_headers)
    seen = {Need.ROUTE} if H_BACKEND in set_headers else set()
    if ex.translated:
        seen.add(Need.TRANSLATE)
    if "authorization" in set_headers or "x-api-key" in set_headers:
        seen.add(Need.INJECT_KEY)
    if "api-version=" in set_headers.get(":path", ""):
        seen.add(Need.PROVIDER_SHAPE)
    if H_FIRST_CONTACT in set_headers:
        seen.add(Need.LEARN)
    if any(PREVIOUS in k for k in asked):
        seen.add(Need.CONTINUE)
    held = any(k == CONVERSATION for k in asked)  # the conversation read as the history...
    if not act.done:  # the answer a real upstream sends, and what the processor does with it
        upstream = ex.upstream_api or api
        ctype, answer = upstream_answer(upstream, json.loads(act.body) if act.body else body)
        headed = ex.response_headers({":status": "200", "content-type": ctype})
        writes = list(headed.writes)
        if not headed.done:
            writes += ex.response_body(answer, True).writes
        if any(k.startswith("pin:") and k.endswith(":" + UPSTREAM_ID) for k, _ in writes):
            seen.add(Need.RECORD_ID)
        if any(k.startswith("turn:") for k, _ in writes):
            seen.add(Need.KEEP_TURN)
        if any(k == learned_key(set_headers[H_BACKEND], body["model"]) for k, _ in writes):
            seen.add(Need.LEARN)  # a backend reached by cluster learns from the answer, not by a retry
        if ex.usage is not None and not ex.translated:  # a translator counts its own answers
            seen.add(Need.ESTIMATE_USAGE if ex.usage.estimated else Need.COUNT_USAGE)
        if held and any(k == CONVERSATION for k, _ in writes):  # ...and the answer appended to it
            seen.add(Need.CONVERSATION)
    return Seen(frozenset(seen), backend=set_headers.get(H_BACKEND), translated=ex.translated)


def mismatches(extra: str) -> list[str]:
    """Every (model, client API, facts) where the processor, `needs` and Envoy's routes disagree."""
    cfg = parse_config(CONFIG + extra, env={"KEY": "sk-test"})
    tick = itertools.count(0, 10**6)
    gw = Gateway(cfg, Knowledge(), clock=lambda: float(next(tick)))  # a remembered fact is always stale:
    store = {learned_key(b, m): fact.dumps() for (b, m), fact in LEARNED.items()}  # every exchange asks the store
    store[CONVERSATION] = Record("conv_1", 1, {}, [{"type": "message", "id": "msg_0", "role": "user",
                                                   "content": [{"type": "input_text", "text": "before"}]}]).dumps()
    compiled = compile_routes(cfg, Knowledge(), LEARNED)
    classifier = Classifier(cfg, Knowledge())
    names = [n for n in Facts.__dataclass_fields__ if n not in ("client_api", "call")]
    bad = []
    for model, api in itertools.product(MODELS, APIS):
        backend = classifier.backend_for(model)
        learned = LEARNED.get((backend.name, model)) if backend else None
        plain: dict[tuple[bool, ...], Seen] = {}  # the same request without the mode header
        for values in itertools.product((False, True), repeat=len(names)):
            facts = dict(zip(names, values, strict=True))
            mode = None
            if facts["mode_header"]:  # a value that changes the decision, if the processor honours it
                without = plain[tuple(False if n == "mode_header" else facts[n] for n in names)]
                mode = api if without.translated or without.refused == (400, "unsupported_api") else other(api)
            body, headers = request(api, model, facts, mode)
            seen = process(gw, store, api, body, headers)
            if not facts["mode_header"]:
                plain[values] = seen
            elif seen.refused is None and (seen.translated, seen.refused) != (without.translated, without.refused):
                seen = Seen(seen.needs | {Need.MODE_OVERRIDE}, seen.refused, seen.backend, seen.translated)
            override = mode if cfg.discovery.allow_mode_header else None
            res = classifier.resolve(model, override=override, learned=learned) if backend else None
            want = needs(cfg, res, Facts.of(api, Call.CREATE, body, headers), learned)
            route = first_match(compiled, PATHS[api], metadata(body), headers)
            where = f"{model} {api} {facts} mode={mode}"
            if seen.refused is not None and seen.refused not in REFUSALS:
                # refused on the way, by a translator (a field the other API lacks) or the state (an id
                # nobody holds), before anything else shows: both sides must leave it to the processor
                if is_fast(cfg, want) or route != "processor":
                    bad.append(f"{where}: refused {seen.refused}, needs {sorted(n.value for n in want)}, {route}")
                continue
            if seen.needs != want:
                bad.append(f"{where}: the processor did {sorted(n.value for n in seen.needs)}, "
                           f"needs says {sorted(n.value for n in want)}")
            fast = f"fast:{api}:{seen.backend}"
            if route != (fast if is_fast(cfg, seen.needs) else "processor"):
                bad.append(f"{where}: Envoy takes {route}, the processor did {sorted(n.value for n in seen.needs)}")
    return bad


@pytest.mark.parametrize("extra", CONFIGS.values(), ids=CONFIGS.keys())
def test_processor_needs_and_envoy_agree_on_every_request(extra):
    assert mismatches(extra) == []


def test_the_combinations_reach_every_need_and_both_paths():
    """The models and facts above are enough to show each need, fast and processor alike."""
    cfg = parse_config(CONFIG + CONFIGS["usage all, mode header honoured"], env={"KEY": "sk-test"})
    classifier = Classifier(cfg, Knowledge())
    reached: set[Need] = set()
    fast = set()
    for model, api in itertools.product(MODELS, APIS):
        backend = classifier.backend_for(model)
        learned = LEARNED.get((backend.name, model)) if backend else None
        res = classifier.resolve(model, learned=learned) if backend else None
        for values in itertools.product((False, True), repeat=7):
            n = needs(cfg, res, Facts(api, Call.CREATE, *values), learned)
            reached |= n
            fast.add(is_fast(cfg, n))
    # compact and count have no fast route to compare
    assert reached == set(Need) - {Need.SIDECAR_CALL, Need.ESTIMATE_COUNT, Need.COMPACT_FALLBACK}
    assert fast == {True, False}


def test_a_drift_on_either_side_is_found(monkeypatch):
    """The comparison fails when Envoy's routes read a fact wrongly, or the processor stops doing a need."""
    from extproc.routing import compile as compiler
    from extproc.routing.gateway import Target

    extra = CONFIGS["usage translated"]
    with monkeypatch.context() as m:  # Envoy reads `store` the wrong way round
        m.setitem(compiler._FACT_METADATA, "stored", (*compiler._FACT_METADATA["stored"][:2], True))
        assert any("Envoy takes" in line for line in mismatches(extra))
    with monkeypatch.context() as m:  # the processor forgets the backend's key
        m.setattr(Target, "headers", lambda self, api=None: [(H_BACKEND, self.backend.name)])
        assert any("keyed-1" in line and "the processor did" in line for line in mismatches(extra))
