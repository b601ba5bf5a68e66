"""The metrics of one exchange, sans-IO: bounded model labels, the GenAI time formulas, the exposition."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from extproc.config import parse_config
from extproc.exchange import Exchange
from extproc.ops.metrics import Metrics
from extproc.ops.record import record
from extproc.routing.gateway import Gateway

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
    g = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "chat", "gen_ai_request_model": "llama-*"}

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
                   "gen_ai_request_model": "llama-*", "gen_ai_token_type": "output"}.items())
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
