"""Envoy's OpenTelemetry access log: requests, token usage and GenAI metrics of answers Envoy counts.

Fast-path requests never reach the processor, so Envoy reports them afterwards, batched, as OTLP log
records (`LogsService.Export`) whose body holds exactly what is counted here (`FIELDS`, one formatted
value each): the route name (`fast:<client api>:<backend>`, routing.compile), the status, the upstream
address, the duration, and the dynamic metadata its `json_to_metadata` (JSON answers) and
`sse_to_metadata` (streams) filters read from the body: the model and the token counts. A processed
request whose answer passes through and is read for nothing but its usage (`routing.needs.envoy_counts`)
is counted the same way: the processor lets the answer go and marks the entry (`Key.ENVOY_COUNTS`, with
its client API and backend). deploy/envoy.yaml logs only those two kinds here (a CEL filter), so
requests the processor counts itself are never counted twice.

Measured (benchmarks/fastpath_cost.py `als-otel`): Envoy's gRPC access-log entry (every address, timing,
header and metadata namespace, the metadata as a Struct) cost Envoy about as much as all its other
fast-path pieces and the sidecar 15-20 µs per request to decode; these records carry only the fields
read here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from grpclib.const import Handler
from grpclib.server import Stream
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

from extproc.api import MESSAGES
from extproc.envoy.names import NAMESPACE, Key
from extproc.envoy.ratelimit import TenantMeter
from extproc.envoy.serving import methods
from extproc.ops.metrics import Metrics
from extproc.ops.record import OPERATION, status_outcome
from extproc.routing.compile import FAST

log = logging.getLogger("extproc")
TOKEN_KINDS = (("input", Key.INPUT_TOKENS), ("output", Key.OUTPUT_TOKENS), ("cached", Key.CACHED_TOKENS),
               ("reasoning", Key.REASONING_TOKENS))
ROUTE, STATUS, UPSTREAM, DURATION_US = "route", "status", "upstream", "duration_us"
# The log record's body (deploy/envoy.yaml): one line of these values, each formatted by its command
# operator, joined by SEPARATOR. The model is last and split off last: the one value a client chose (a
# processed request's may hold any character), so it cannot shift the others; the rest are numbers,
# addresses, fixed words and the config's names. A value Envoy does not have is "-" (or empty): absent.
FIELDS: dict[str, str] = {
    DURATION_US: "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",  # the request's first byte to the answer's last
    **{key: f"%DYNAMIC_METADATA({NAMESPACE}:{key})%" for key in (*(k for _, k in TOKEN_KINDS), Key.CACHE_WRITE_TOKENS)},
    ROUTE: "%ROUTE_NAME%", STATUS: "%RESPONSE_CODE%", UPSTREAM: "%UPSTREAM_HOST%",
    **{key: f"%DYNAMIC_METADATA({NAMESPACE}:{key})%" for key in (
        Key.CLIENT_API, Key.BACKEND, Key.ENVOY_COUNTS, Key.TENANT, Key.MODEL)},
}
SEPARATOR = "\x1f"  # ASCII's unit separator
BODY = SEPARATOR.join(FIELDS.values())
_NAMES = tuple(FIELDS)
_ABSENT = ("-", "")


def fields_of(record: logs_pb2.LogRecord) -> dict[str, str]:
    """The body's values Envoy had (the wire shape, decoded once)."""
    values = record.body.string_value.split(SEPARATOR, len(_NAMES) - 1)  # fewer only from another config
    return {name: v for name, v in zip(_NAMES, values, strict=False) if v not in _ABSENT}


def _number(value: str) -> int:
    return int(float(value))  # Envoy writes metadata numbers as JSON does: 11 or 11.5


def count(metrics: Metrics, fields: dict[str, str], label_for: Callable[[str | None], str],
          tenants: TenantMeter | None = None, backend_at: Callable[[str, str], str] | None = None) -> None:
    """One fast-path request, or one the processor left to Envoy, in the metrics; other entries are
    ignored. `backend_at` names the backend that answered a route to a model group's cluster, by the
    upstream address Envoy used."""
    kind, _, rest = fields.get(ROUTE, "").partition(":")
    client_api, _, backend = rest.partition(":")
    if kind == FAST and backend:
        if backend_at is not None:
            backend = backend_at(backend, fields.get(UPSTREAM, ""))
    elif Key.ENVOY_COUNTS in fields and Key.CLIENT_API in fields and Key.BACKEND in fields:
        client_api, backend = fields[Key.CLIENT_API], fields[Key.BACKEND]  # passed through
    else:
        return
    model = label_for(fields.get(Key.MODEL))
    status = _number(fields.get(STATUS, "0"))
    metrics.requests.inc(client_api, client_api, backend, model, status_outcome(status))
    counts = {key: _number(fields[key]) for key in (*(k for _, k in TOKEN_KINDS), Key.CACHE_WRITE_TOKENS)
              if key in fields}
    if client_api == MESSAGES:  # Anthropic counts cached input apart from input_tokens; OpenAI within
        counts[Key.INPUT_TOKENS] = counts.get(Key.INPUT_TOKENS, 0) + counts.get(Key.CACHED_TOKENS, 0) + \
            counts.pop(Key.CACHE_WRITE_TOKENS, 0)
    for kind_label, key in TOKEN_KINDS:
        if (n := counts.get(key, 0)) > 0:
            metrics.tokens.inc(model, backend, kind_label, "false", by=n)
    # The GenAI metrics, as record._genai has them (Envoy saw every answer to its end; no stream timing).
    labels = (OPERATION, backend, model)
    took = _number(fields.get(DURATION_US, "0")) / 1e6
    metrics.request_duration.observe(took, *labels, "" if 200 <= status < 300 else str(status))
    for kind_label, key in TOKEN_KINDS[:2]:
        if key in counts:
            metrics.token_usage.observe(counts[key], *labels, kind_label)
    if tenants is not None and Key.TENANT in fields:  # set by Envoy's key check (extproc/clients.lua)
        tenants.count(fields[Key.TENANT], counts.get(Key.INPUT_TOKENS, 0), counts.get(Key.OUTPUT_TOKENS, 0))


class AccessLog:
    def __init__(self, metrics: Metrics, label_for: Callable[[str | None], str],
                 tenants: TenantMeter | None = None, backend_at: Callable[[str, str], str] | None = None):
        self.metrics = metrics
        self.backend_at = backend_at
        self.tenants = tenants
        self.label_for = label_for  # bounds the model label, as for processed requests

    def __mapping__(self) -> dict[str, Handler]:
        return methods(logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"], self)

    async def Export(self, stream: Stream[logs_service_pb2.ExportLogsServiceRequest,
                                          logs_service_pb2.ExportLogsServiceResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None  # a unary call's one message
        for resource in request.resource_logs:
            # xds-protos' OTLP predates the rename to scope_logs / log_records: the same fields (2, 2)
            for scope in resource.instrumentation_library_logs:
                for record in scope.logs:
                    try:
                        count(self.metrics, fields_of(record), self.label_for, self.tenants, self.backend_at)
                    except Exception:  # one odd record must not lose the rest of the batch
                        log.exception("access log record not counted")
        await stream.send_message(logs_service_pb2.ExportLogsServiceResponse())
