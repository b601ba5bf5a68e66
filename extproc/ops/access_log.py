"""Envoy's gRPC access-log service: requests, token usage and GenAI metrics of answers Envoy counts.

Fast-path requests never reach the processor, so Envoy reports them afterwards, batched: the route
name (`fast:<client api>:<backend>`, routing.compile), the status, and the dynamic metadata its
`json_to_metadata` (JSON answers) and `sse_to_metadata` (streams) filters read from the body: the
model and the token counts. A processed request whose answer passes through and is read for nothing
but its usage (`routing.needs.envoy_counts`) is counted the same way: the processor lets the answer go
and marks the entry (`Key.ENVOY_COUNTS`, with its client API and backend). deploy/envoy.yaml logs only
those two kinds here (a CEL filter), so requests the processor counts itself are never counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from grpclib.const import Handler
from grpclib.server import Stream

from extproc.api import MESSAGES
from extproc.envoy.names import NAMESPACE, Key
from extproc.envoy.ratelimit import TenantMeter
from extproc.envoy.serving import methods
from extproc.envoy.xds import LongStreams
from extproc.ops.metrics import Metrics
from extproc.ops.record import OPERATION, status_outcome
from extproc.routing.compile import FAST

log = logging.getLogger("extproc")
TOKEN_KINDS = (("input", Key.INPUT_TOKENS), ("output", Key.OUTPUT_TOKENS), ("cached", Key.CACHED_TOKENS),
               ("reasoning", Key.REASONING_TOKENS))


def count(metrics: Metrics, entry: accesslog_pb2.HTTPAccessLogEntry, label_for: Callable[[str | None], str],
          tenants: TenantMeter | None = None, backend_at: Callable[[str, str], str] | None = None) -> None:
    """One fast-path request, or one the processor left to Envoy, in the metrics; other entries are
    ignored. `backend_at` names the backend that answered a route to a model group's cluster, by the
    upstream address Envoy used."""
    common = entry.common_properties
    fields = common.metadata.filter_metadata[NAMESPACE].fields if NAMESPACE in common.metadata.filter_metadata else {}
    kind, _, rest = common.route_name.partition(":")
    client_api, _, backend = rest.partition(":")
    if kind == FAST and backend:
        if backend_at is not None:
            sock = common.upstream_remote_address.socket_address
            backend = backend_at(backend, f"{sock.address}:{sock.port_value}")
    elif Key.ENVOY_COUNTS in fields and Key.CLIENT_API in fields and Key.BACKEND in fields:
        client_api, backend = fields[Key.CLIENT_API].string_value, fields[Key.BACKEND].string_value  # passed through
    else:
        return
    model = label_for(fields[Key.MODEL].string_value if Key.MODEL in fields else None)
    status = entry.response.response_code.value
    metrics.requests.inc(client_api, client_api, backend, model, status_outcome(status))
    counts = {key: int(fields[key].number_value) for key in (*(k for _, k in TOKEN_KINDS), Key.CACHE_WRITE_TOKENS)
              if key in fields}
    if client_api == MESSAGES:  # Anthropic counts cached input apart from input_tokens; OpenAI within
        counts[Key.INPUT_TOKENS] = counts.get(Key.INPUT_TOKENS, 0) + counts.get(Key.CACHED_TOKENS, 0) + \
            counts.pop(Key.CACHE_WRITE_TOKENS, 0)
    for kind_label, key in TOKEN_KINDS:
        if (n := counts.get(key, 0)) > 0:
            metrics.tokens.inc(model, backend, kind_label, "false", by=n)
    # The GenAI metrics, as record._genai has them (Envoy saw every answer to its end; no stream timing).
    labels = (OPERATION, backend, model)
    took = common.time_to_last_downstream_tx_byte
    metrics.request_duration.observe(took.seconds + took.nanos / 1e9, *labels, "" if 200 <= status < 300 else str(status))
    for kind_label, key in TOKEN_KINDS[:2]:
        if key in counts:
            metrics.token_usage.observe(counts[key], *labels, kind_label)
    if tenants is not None and Key.TENANT in fields:  # set by Envoy's key check (extproc/clients.lua)
        tenants.count(fields[Key.TENANT].string_value, counts.get(Key.INPUT_TOKENS, 0), counts.get(Key.OUTPUT_TOKENS, 0))


class AccessLog:
    def __init__(self, metrics: Metrics, streams: LongStreams, label_for: Callable[[str | None], str],
                 tenants: TenantMeter | None = None, backend_at: Callable[[str, str], str] | None = None):
        self.metrics = metrics
        self.backend_at = backend_at
        self.tenants = tenants
        self.streams = streams
        self.label_for = label_for  # bounds the model label, as for processed requests

    def __mapping__(self) -> dict[str, Handler]:
        return methods(als_pb2.DESCRIPTOR.services_by_name["AccessLogService"], self)

    async def StreamAccessLogs(self, stream: Stream[als_pb2.StreamAccessLogsMessage,
                                                    als_pb2.StreamAccessLogsResponse]) -> None:
        async for message in self.streams.messages(stream):
            for entry in message.http_logs.log_entry:
                try:
                    count(self.metrics, entry, self.label_for, self.tenants, self.backend_at)
                except Exception:  # one odd entry must not end the stream (Envoy would drop the rest)
                    log.exception("access log entry not counted")
        await stream.send_message(als_pb2.StreamAccessLogsResponse())
