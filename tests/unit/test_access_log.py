"""The access-log service's records: the line Envoy formats (ops.access_log.FIELDS) read back into the
metrics, and a batch of them over gRPC as Envoy's OpenTelemetry access logger sends it."""

from __future__ import annotations

import asyncio

from grpclib.client import Channel
from grpclib.const import Cardinality
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

from extproc.envoy import serving
from extproc.local.stack import free_port
from extproc.ops.access_log import FIELDS, SEPARATOR, AccessLog, count, fields_of
from extproc.ops.metrics import Metrics


def record(**values: str) -> logs_pb2.LogRecord:
    """A record as Envoy writes it: every field in FIELDS' order, `-` where Envoy has no value."""
    out = logs_pb2.LogRecord()
    out.body.string_value = SEPARATOR.join(values.get(name, "-") for name in FIELDS)
    return out


def fast(model: str, **values: str) -> logs_pb2.LogRecord:
    return record(route="fast:chat:chat", status="200", upstream="127.0.0.1:9", duration_us="250000",
                  input_tokens="11", output_tokens="7", model=model, **values)


def samples(m: Metrics, name: str) -> dict[frozenset, float]:
    return {frozenset(s.labels.items()): s.value for f in m.collect() for s in f.samples if s.name == name}


def test_absent_values_are_left_out_and_the_others_kept_as_formatted():
    assert fields_of(fast("llama-3", cached_tokens="3")) == {
        "route": "fast:chat:chat", "status": "200", "upstream": "127.0.0.1:9", "duration_us": "250000",
        "input_tokens": "11", "output_tokens": "7", "cached_tokens": "3", "model": "llama-3"}


def test_a_model_name_holding_the_separator_cannot_shift_the_other_values():
    """The model is the one value a client chose: last, so whatever it holds stays the model."""
    forged = SEPARATOR.join(["x", "999999", "-", "tenant-b"])
    got = fields_of(fast(forged, tenant="tenant-a"))
    assert got["model"] == forged and got["tenant"] == "tenant-a" and got["input_tokens"] == "11"


def test_a_fast_path_record_counts_its_request_tokens_and_genai_series():
    m = Metrics()
    count(m, fields_of(fast("llama-3", reasoning_tokens="2")), lambda model: "llama-*")
    assert samples(m, "extproc_requests_total") == {frozenset({
        "client_api": "chat", "upstream_api": "chat", "backend": "chat", "model": "llama-*", "outcome": "ok"}.items()): 1}
    assert {dict(k)["kind"]: v for k, v in samples(m, "extproc_tokens_total").items()} == \
        {"input": 11, "output": 7, "reasoning": 2}
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "chat", "gen_ai_request_model": "llama-*"}
    assert samples(m, "gen_ai_server_request_duration_seconds_sum") == {frozenset({**genai, "error_type": ""}.items()): 0.25}
    assert samples(m, "gen_ai_client_token_usage_sum") == {
        frozenset({**genai, "gen_ai_token_type": "input"}.items()): 11,
        frozenset({**genai, "gen_ai_token_type": "output"}.items()): 7}


def test_a_processed_record_counts_only_when_the_processor_marked_it():
    m = Metrics()
    left = {"route": "processor:endpoint", "status": "502", "client_api": "messages", "backend": "anthropic",
            "input_tokens": "5", "cached_tokens": "3", "cache_creation_tokens": "2", "model": "claude"}
    count(m, fields_of(record(**left)), lambda model: model or "unknown")  # not marked: the processor counted it
    assert not samples(m, "extproc_requests_total")
    count(m, fields_of(record(**left, envoy_counts="true")), lambda model: model or "unknown")
    assert samples(m, "extproc_requests_total") == {frozenset({
        "client_api": "messages", "upstream_api": "messages", "backend": "anthropic", "model": "claude",
        "outcome": "upstream_5xx"}.items()): 1}
    # Anthropic counts cached input and cache writes apart from input_tokens: input is all three
    assert {dict(k)["kind"]: v for k, v in samples(m, "extproc_tokens_total").items()} == {"input": 10, "cached": 3}


def test_a_batch_sent_as_envoy_sends_it_is_counted_whole():
    async def go() -> Metrics:
        m = Metrics()
        service = AccessLog(m, lambda model: "llama-*")
        server = serving.GrpcServer([service], checked=service)
        port = free_port()
        await server.start(f"127.0.0.1:{port}", None)
        channel = Channel("127.0.0.1", port)
        try:
            request = logs_service_pb2.ExportLogsServiceRequest()
            # xds-protos' OTLP names the fields Envoy fills (scope_logs, log_records) by their older names
            logs = request.resource_logs.add().instrumentation_library_logs.add().logs
            logs.extend([fast("llama-3"), record(route="processor:endpoint", status="200"), fast("llama-4")])
            async with channel.request("/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                                       Cardinality.UNARY_UNARY, logs_service_pb2.ExportLogsServiceRequest,
                                       logs_service_pb2.ExportLogsServiceResponse) as call:
                await call.send_message(request, end=True)
                assert await call.recv_message() == logs_service_pb2.ExportLogsServiceResponse()
            server.drain()
            await asyncio.wait_for(server.finish(30), 5)
        finally:
            channel.close()
        return m

    m = asyncio.run(go())
    assert sum(samples(m, "extproc_requests_total").values()) == 2
