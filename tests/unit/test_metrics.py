"""The metrics of one exchange, sans-IO: bounded model labels, the GenAI time formulas, the exposition."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import parse_config
from extproc.exchange import Exchange
from extproc.ops.metrics import Metrics
from extproc.ops.record import record
from extproc.routing.gateway import Gateway

from .recorded import RESPONSES_FULL

GW = Gateway(parse_config("""
backends:
  - {name: chat, api: chat, models: ["llama-*", "qwen3-8b"], endpoints: ["10.0.0.1:80"]}
""", env={}))


def test_model_label_is_the_configured_name_or_pattern():
    label = GW.classifier.label_for
    assert label("llama-3.1-8b") == "llama-*"
    assert label("qwen3-8b") == "qwen3-8b"
    assert label("anything-else") == "unknown"
    assert label(None) == "unknown"
    assert label("") == "unknown"


def samples(m: Metrics) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}


def translated_stream(output_tokens: int, usage: bool = True) -> Exchange:
    """A Responses client's stream from a chat backend, fed to its end; the upstream reports 11 input
    and `output_tokens` output tokens, or no usage at all."""
    ex = Exchange(GW)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    ex.request_body(json.dumps({"model": "llama-3", "input": "hi", "stream": True}).encode())
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "llama-3"}
    events = [{**base, "choices": [{"index": 0, "delta": {"content": "x" * 40}, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    if usage:
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": output_tokens}})
    for e in events:
        ex.response_body(b"data: " + json.dumps(e).encode() + b"\n\n", False)
    ex.response_body(b"data: [DONE]\n\n", True)
    return ex


def test_stream_times_follow_the_definitions():
    """TTFT: request start to first chunk out; per output token: (last - first) / (output tokens - 1)."""
    m = Metrics()
    timer = m.timer()
    timer.started = 10.0
    timer.message("request_headers", 10.0, 10.001)
    timer.message("request_body", 10.002, 10.003)
    timer.message("response_headers", 10.4, 10.4)
    for done in (10.6, 11.0, 11.8):
        timer.message("response_body", done - 0.001, done)
    ex = translated_stream(output_tokens=7)
    record(ex, m, timer, GW.classifier.label_for)
    got = samples(m)
    g = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "chat", "gen_ai_request_model": "llama-*",
         "gen_ai_response_model": "llama-*"}  # the stream names the model asked for: the request's label

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset({**g, **labels}.items()))]

    assert abs(value("gen_ai_server_time_to_first_token_seconds_sum") - 0.6) < 1e-9
    assert abs(value("gen_ai_server_time_per_output_token_seconds_sum") - 1.2 / 6) < 1e-9
    assert abs(value("gen_ai_server_request_duration_seconds_sum", error_type="") - 1.8) < 1e-9
    assert value("gen_ai_server_time_to_first_token_seconds_bucket", le="0.5") == 0
    assert value("gen_ai_server_time_to_first_token_seconds_bucket", le="0.75") == 1
    assert value("gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 7
    assert got[("extproc_phase_seconds_count", frozenset({"phase": "response_body"}.items()))] == 3
    assert got[("extproc_translations_total", frozenset({"direction": "responses_to_chat", "stream": "true"}.items()))] == 1


def test_estimated_usage_and_single_tokens_are_not_timed_per_token():
    m = Metrics()
    for ex in (translated_stream(output_tokens=1), translated_stream(0, usage=False)):
        assert ex.usage is not None
        timer = m.timer()
        timer.message("response_body", timer.started, timer.started + 0.1)
        record(ex, m, timer, GW.classifier.label_for)
    names = {name for name, _ in samples(m)}
    assert "gen_ai_server_time_per_output_token_seconds_count" not in names
    got = samples(m)
    g = frozenset({"gen_ai_operation_name": "chat", "gen_ai_provider_name": "chat",
                   "gen_ai_request_model": "llama-*", "gen_ai_token_type": "output",
                   "gen_ai_response_model": "llama-*"}.items())
    assert got[("gen_ai_client_token_usage_count", g)] == 1  # the estimate stays out
    assert got[("gen_ai_server_time_to_first_token_seconds_count", g - {("gen_ai_token_type", "output")})] == 2


def test_an_exchange_left_to_envoy_is_counted_from_its_access_log_entry_only():
    """The processor records no request or tokens for it; the access-log service counts Envoy's entry,
    marked by the processor's metadata, as it counts a fast-path one; an unmarked processor-path entry
    is not counted there (the processor counted it)."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    from extproc.ops import access_log

    m = Metrics()
    ex = Exchange(GW, envoy_counts=True)
    ex.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}, False)
    assert ex.request_body(json.dumps({"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]}).encode()).done
    record(ex, m, m.timer(), GW.classifier.label_for)
    assert not [k for k in samples(m) if k[0] in ("extproc_requests_total", "extproc_tokens_total")]

    def entry(meta: dict) -> accesslog_pb2.HTTPAccessLogEntry:
        e = accesslog_pb2.HTTPAccessLogEntry()
        e.common_properties.route_name = "processor:endpoint"
        e.common_properties.metadata.filter_metadata["llm_gateway"].update(meta)
        e.response.response_code.value = 200
        return e

    usage = {"input_tokens": 11, "output_tokens": 7}
    access_log.count(m, entry({**ex.metadata(), **usage}), GW.classifier.label_for)
    access_log.count(m, entry({"model": "llama-3", "client_api": "chat", "backend": "chat", **usage}),
                     GW.classifier.label_for)
    got = samples(m)
    assert got[("extproc_requests_total", frozenset({"client_api": "chat", "upstream_api": "chat", "backend": "chat",
                                                     "model": "llama-*", "outcome": "ok"}.items()))] == 1
    assert got[("extproc_tokens_total", frozenset({"model": "llama-*", "backend": "chat", "kind": "input",
                                                   "estimated": "false"}.items()))] == 11


# -- gen_ai_response_model: the model the upstream's answer names ------------------------------------------

NAMED = Gateway(parse_config("""
backends:
  - {name: chat, api: chat, models: ["llama-*"], endpoints: ["10.0.0.1:80"]}
  - {name: resp, api: responses, models: ["gpt-5*"], endpoints: ["10.0.0.2:80"]}
  - {name: claude, api: messages, models: ["claude-*"], endpoints: ["10.0.0.3:80"]}
""", env={}))
SSE = "text/event-stream"
JSON = "application/json"


def _completion(model: str | None) -> bytes:
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 11, "completion_tokens": 7}}
    return json.dumps(doc if model is None else {**doc, "model": model}).encode()


def _message(model: str) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "stop_reason": "end_turn",
            "stop_sequence": None, "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 11, "output_tokens": 7}}


def _message_stream(model: str) -> bytes:
    start = {**_message(model), "content": [], "stop_reason": None, "usage": {"input_tokens": 11, "output_tokens": 1}}
    events = [{"type": "message_start", "message": start},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
               "usage": {"output_tokens": 7}}, {"type": "message_stop"}]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _chat_stream(model: str) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _answered(path: str, body: dict, ctype: str, answer: bytes) -> dict[frozenset, float]:
    """One exchange answered `answer`; the gen_ai_client_token_usage_count series it left, by label set."""
    m = Metrics()
    ex = Exchange(NAMED)
    ex.request_headers({":method": "POST", ":path": path, "content-type": "application/json"}, False)
    ex.request_body(json.dumps(body).encode())
    ex.response_headers({":status": "200", "content-type": ctype})
    ex.response_body(answer, True)
    record(ex, m, m.timer(), NAMED.classifier.label_for)
    return {labels: v for (name, labels), v in samples(m).items() if name == "gen_ai_client_token_usage_count"}


CHAT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}
PATTERN = {"llama-3": "llama-*", "gpt-5": "gpt-5*", "claude-sonnet": "claude-*"}  # NAMED's patterns they match


@pytest.mark.parametrize(("path", "body", "ctype", "answer", "named"), [
    # a Responses client on a chat model, buffered and streamed: the chat answer's `model`
    ("/v1/responses", {"model": "llama-3", "input": "hi"}, JSON, _completion("Meta-Llama-3.1-70B-Instruct"),
     "Meta-Llama-3.1-70B-Instruct"),
    ("/v1/responses", {"model": "llama-3", "input": "hi", "stream": True}, SSE, _chat_stream("llama-served"),
     "llama-served"),
    # a chat client on a Responses model, streamed: response.created's response.model
    ("/v1/chat/completions", {"model": "gpt-5", **CHAT_REQUEST, "stream": True}, SSE, RESPONSES_FULL, "gpt-5.3-codex"),
    # passed through, its usage read on the way: the JSON body's, the usage chunk's
    ("/v1/chat/completions", {"model": "llama-3", **CHAT_REQUEST}, JSON, _completion("llama-3-snapshot"),
     "llama-3-snapshot"),
    ("/v1/chat/completions", {"model": "llama-3", **CHAT_REQUEST, "stream": True,
                              "stream_options": {"include_usage": True}}, SSE, _chat_stream("llama-3-b"), "llama-3-b"),
    # Messages upstreams: the message's model, message_start's
    ("/v1/chat/completions", {"model": "claude-sonnet", **CHAT_REQUEST}, JSON,
     json.dumps(_message("claude-sonnet-4-5-20250929")).encode(), "claude-sonnet-4-5-20250929"),
    ("/v1/responses", {"model": "claude-sonnet", "input": "hi", "stream": True}, SSE,
     _message_stream("claude-sonnet-4-5-20250929"), "claude-sonnet-4-5-20250929"),
])
def test_the_response_model_is_the_one_the_upstreams_answer_names(path, body, ctype, answer, named):
    series = _answered(path, body, ctype, answer)
    assert series, "no token usage recorded"
    for labels in series:
        got = dict(labels)
        assert got["gen_ai_response_model"] == named
        assert got["gen_ai_request_model"] == PATTERN[body["model"]]  # the request's, bounded


def test_an_answer_naming_the_model_asked_for_gets_the_requests_label_and_one_naming_none_no_label():
    """An upstream that echoes the requested name (vLLM, the test upstreams) must not let clients grow the
    series: the request model's own label; an answer without a model has none (Prometheus: absent)."""
    echoed = _answered("/v1/chat/completions", {"model": "llama-3", **CHAT_REQUEST}, JSON, _completion("llama-3"))
    assert {dict(labels)["gen_ai_response_model"] for labels in echoed} == {"llama-*"}
    unnamed = _answered("/v1/chat/completions", {"model": "llama-3", **CHAT_REQUEST}, JSON, _completion(None))
    assert {dict(labels).get("gen_ai_response_model", "") for labels in unnamed} == {""}


def test_response_models_are_bounded():
    from extproc.ops.metrics import RESPONSE_MODELS_KEPT, ResponseModels

    kept = ResponseModels()
    names = [f"model-{i}" for i in range(RESPONSE_MODELS_KEPT + 5)]
    assert [kept.label(n) for n in names] == names[:RESPONSE_MODELS_KEPT] + ["other"] * 5
    assert kept.label("model-0") == "model-0"  # one kept stays kept
    fresh = ResponseModels()
    assert fresh.label("bad\nname") == "other" and fresh.label("x" * 257) == "other"
    assert fresh.label("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"


def test_access_log_entries_name_no_response_model():
    """The fast path's access-log entry carries the request's model only: its GenAI series have an empty
    response model (absent), beside the processor's, which name it."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    from extproc.ops import access_log

    m = Metrics()
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.route_name = "fast:chat:chat"
    e.common_properties.metadata.filter_metadata["llm_gateway"].update({"model": "llama-3", "input_tokens": 11,
                                                                        "output_tokens": 7})
    e.response.response_code.value = 200
    access_log.count(m, e, NAMED.classifier.label_for)
    series = [dict(labels) for (name, labels), _ in samples(m).items() if name == "gen_ai_client_token_usage_count"]
    assert series and all(s.get("gen_ai_response_model", "") == "" and s["gen_ai_provider_name"] == "chat"
                          for s in series)
