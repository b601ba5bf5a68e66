"""Envoy's log of each fast-path model-group attempt: counted, and told to its member's health.

A fast-path request for a model group is carried by Envoy alone (routes to `fast-group.A.B`,
routing/group_routes.py): no processor sees its attempts, except the judge of an error answer. So
Envoy's router logs every upstream attempt on those clusters (`upstream_log` in deploy/envoy.yaml, a
CEL filter on the cluster's name) to this OpenTelemetry logs service, batched, off the request path:
the cluster, the instance, the status, Envoy's response flags, the judge's mark and a `retry-after`.
Each becomes the `Attempt` a processor attempt would be (a refused connection included, which no
upstream filter ever sees), counted in `extproc_upstream_attempts_total` and recorded in `Health`
(`Metrics.record_attempt`), so `/readyz` and `extproc_backend_state` show fast-path failures too.

Kept apart from the access-log service (ops/access_log.py, one entry per request): a service and a
message of its own (OTLP's `LogsService`), so either can change without the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from grpclib.const import Handler
from grpclib.server import Stream
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from extproc.config import Config
from extproc.envoy.serving import methods
from extproc.exchange.failover import LAST_MARK
from extproc.ops.metrics import Metrics
from extproc.routing.failover import Attempt, Health, Transport, Verdict, retry_after_seconds
from extproc.routing.group_routes import fast_members, member_on

log = logging.getLogger("extproc")

# deploy/envoy.yaml's upstream_log names each attribute so.
CLUSTER, HOST, STATUS, FLAGS, MARK = "cluster", "host", "status", "flags", "retried"
RETRY_AFTER = ("retry-after", "retry-after-ms")


def attempt_of(config: Config, fields: Mapping[str, str]) -> Attempt | None:
    """One logged attempt as an `Attempt`, or None when it names no member (another cluster, an instance
    no member lists) or was ended by the client going away. The judge's mark (`x-gateway-retry`, its
    value the status it failed over) says the attempt failed; an answer without it was final (a success,
    or an error every member would repeat); no answer at all says why by Envoy's flags."""
    host = fields.get(HOST, "")
    member = member_on(fast_members(config, fields.get(CLUSTER, "")), host)
    if member is None:  # (the attempt after the last is the sentinel's, `NO_MEMBER_HOST`: logged with status 0)
        return None
    status = int(fields.get(STATUS) or 0)
    flags = fields.get(FLAGS, "")
    if status == 0:
        if "DC" in flags:  # the client went away: nothing the member did
            return None
        error = Transport.CONNECT_FAILURE if "UF" in flags else Transport.TIMEOUT if "UT" in flags else Transport.RESET
        return Attempt.failed(member.name, error)
    mark = fields.get(MARK, "")
    failed = mark.removeprefix(LAST_MARK)  # the status the judge failed over (the last: its error replaced)
    verdict = Verdict.FAIL_OVER if mark else Verdict.FINAL
    retry_after = retry_after_seconds({k: v for k in RETRY_AFTER if (v := fields.get(k, ""))})
    return Attempt(member.name, int(failed) if failed.isdigit() else status, "", None, verdict, retry_after)


def record(metrics: Metrics, config: Config, health: Health, request: logs_service_pb2.ExportLogsServiceRequest) -> int:
    """Every attempt of one batch counted and recorded; how many."""
    now, n = time.monotonic(), 0
    for resource in request.resource_logs:
        # (xds-protos ships OTLP's older names of the same fields: scope_logs, log_records on the wire)
        for scope in resource.instrumentation_library_logs:
            for entry in scope.logs:
                fields = {kv.key: kv.value.string_value for kv in entry.attributes if kv.value.string_value != "-"}
                if (attempt := attempt_of(config, fields)) is not None:
                    metrics.record_attempt(attempt, health, now)
                    n += 1
    return n


class AttemptLog:
    """OTLP's logs service, for Envoy's `upstream_log` of the fast-path group clusters."""

    def __init__(self, metrics: Metrics, gateway: Callable[[], tuple[Config, Health]]):
        self.metrics = metrics
        self.gateway = gateway  # the current config and health (a reload replaces the config)

    def __mapping__(self) -> dict[str, Handler]:
        return methods(logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"], self)

    async def Export(self, stream: Stream[logs_service_pb2.ExportLogsServiceRequest,
                                          logs_service_pb2.ExportLogsServiceResponse]) -> None:
        request = await stream.recv_message()
        if request is not None:
            try:
                record(self.metrics, *self.gateway(), request)
            except Exception:  # a batch not counted must not fail Envoy's logger
                log.exception("fast-path attempts not counted")
        await stream.send_message(logs_service_pb2.ExportLogsServiceResponse())
