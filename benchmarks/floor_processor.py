"""The floors: Python ext_proc processors that do nothing but route, one per message pattern the sidecar uses.

Each answers its pattern's messages with no change, except the request body, which gets the one
routing header the sidecar sets for a pass-through request; at response headers it asks Envoy for
the response body in the mode its pattern reads it (`mode_override`, as the sidecar does), and it
closes the stream where its pattern ends:

| pattern          | messages                                              | the sidecar's exchanges of this shape |
|------------------|-------------------------------------------------------|---------------------------------------|
| request          | request headers, buffered request body                | an answer nothing reads (pass-through with `usage_accounting: translated`) |
| response_headers | + response headers                                    | an answer read at its headers only (a keyed backend's success, a learned API) |
| buffered_body    | + the response body, BUFFERED                         | a translated JSON answer; an error read whole (a key scrubbed, a rejection learned) |
| streamed_body    | + the response body, STREAMED (every chunk answered)  | a translated stream; a pass-through whose usage or Responses id is read |
| duplex_body      | + the response body, FULL_DUPLEX_STREAMED (whatever has queued up answered in one message) | none: measured, not better (benchmarks/README.md) |

It serves on the sidecar's own gRPC server (`extproc.envoy.serving.GrpcServer`, grpclib), on uvloop,
reading and writing its stream like the sidecar's `Processor`: whatever Python gRPC costs per message
of a pattern, this pays too, so the sidecar cannot beat it, only approach it.

    python benchmarks/floor_processor.py PORT ENDPOINT [PATTERN]   (default: request)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpclib.const import Handler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from extproc.envoy.serving import GrpcServer, methods

PATTERNS = ("request", "response_headers", "buffered_body", "streamed_body", "duplex_body")
_MODE = {"buffered_body": processing_mode_pb2.ProcessingMode.BUFFERED,
         "streamed_body": processing_mode_pb2.ProcessingMode.STREAMED,
         "duplex_body": processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED}
REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def routed(endpoint: str) -> pb.ProcessingResponse:
    header = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-gateway-destination-endpoint",
                                                                    raw_value=endpoint.encode()),
                                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[header]), clear_route_cache=True)))


def response_headers(pattern: str) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if pattern in _MODE:
        resp.mode_override.response_body_mode = _MODE[pattern]
    if pattern == "duplex_body":  # Envoy's rule for this mode: the trailers are sent too
        resp.mode_override.response_trailer_mode = processing_mode_pb2.ProcessingMode.SEND
    return resp


def streamed(body: bytes, end: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    mutation = resp.response_body.response.body_mutation.streamed_response
    mutation.body = body
    mutation.end_of_stream = end
    return resp


class Floor:
    """One pattern's replies, built once; `Process` only picks one per message and knows where to stop."""

    def __init__(self, endpoint: str, pattern: str):
        self.heads = {"request_headers": REQUEST_HEADERS, "request_body": routed(endpoint),
                      "response_headers": response_headers(pattern)}
        self.last = {"request": "request_body", "response_headers": "response_headers"}.get(pattern, "response_body")
        self.duplex = pattern == "duplex_body"

    def _head(self, kind: str) -> pb.ProcessingResponse | None:
        """The reply to a message before the response body, the same in every pattern (None: a body's or
        the trailers')."""
        return self.heads.get(kind)

    def __mapping__(self) -> dict[str, Handler]:
        return methods(pb.DESCRIPTOR.services_by_name["ExternalProcessor"], self)

    async def _duplex(self, stream):  # type: ignore[no-untyped-def]
        """FULL_DUPLEX_STREAMED: body chunks read ahead by a task, and whatever has queued up answered in one
        message (Envoy does not wait for an answer per chunk in this mode)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def reader() -> None:
            while (req := await stream.recv_message()) is not None:
                queue.put_nowait(req)
            queue.put_nowait(None)
        task = asyncio.create_task(reader())
        try:
            while (req := await queue.get()) is not None:
                kind = req.WhichOneof("request")
                if (head := self._head(kind)) is not None:
                    await stream.send_message(head)
                    if kind == "response_headers" and req.response_headers.end_of_stream:
                        return
                elif kind == "response_body":
                    pieces, end = [req.response_body.body], req.response_body.end_of_stream
                    while not end and not queue.empty():
                        if (nxt := queue.get_nowait()) is None:
                            queue.put_nowait(None)
                            break
                        if nxt.WhichOneof("request") != "response_body":
                            raise RuntimeError(f"unexpected {nxt.WhichOneof('request')}")
                        pieces.append(nxt.response_body.body)
                        end = nxt.response_body.end_of_stream
                    await stream.send_message(streamed(b"".join(pieces), end))
                    if end:
                        return
                elif kind == "response_trailers":
                    await stream.send_message(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
                    return
        finally:
            task.cancel()

    async def Process(self, stream):  # type: ignore[no-untyped-def]
        if self.duplex:
            return await self._duplex(stream)
        while (req := await stream.recv_message()) is not None:
            kind = req.WhichOneof("request")
            if (head := self._head(kind)) is not None:
                await stream.send_message(head)
            else:
                await stream.send_message(RESPONSE_BODY)
                if not req.response_body.end_of_stream:
                    continue
            if kind == self.last or (kind == "response_headers" and req.response_headers.end_of_stream):
                return


async def main(port: int, endpoint: str, pattern: str) -> None:
    floor = Floor(endpoint, pattern)
    await GrpcServer([floor], checked=floor).start(f"127.0.0.1:{port}", None)
    await asyncio.Event().wait()  # until the process is stopped


if __name__ == "__main__":
    name = sys.argv[3] if len(sys.argv) > 3 else "request"
    if name not in PATTERNS:
        sys.exit(f"pattern {name!r}: one of {', '.join(PATTERNS)}")
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], name))
