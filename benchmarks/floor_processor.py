"""The floor: a Python ext_proc processor that does nothing but route, for the benchmark table.

It answers the request headers with no change and the request body with one routing header, as the
sidecar does for a pass-through request, on grpc.aio with uvloop and context.read()/write() (faster
than an async generator there). Whatever Python gRPC costs per
request, this pays too: the sidecar cannot beat it, only approach it.

    python benchmarks/floor_processor.py PORT ENDPOINT
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def routed(endpoint: str) -> pb.ProcessingResponse:
    header = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-gateway-destination-endpoint",
                                                                    raw_value=endpoint.encode()),
                                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[header]), clear_route_cache=True)))


class Floor(pbg.ExternalProcessorServicer):
    def __init__(self, endpoint: str):
        self.body = routed(endpoint)

    async def Process(self, requests, context):  # type: ignore[no-untyped-def,override]
        while (req := await context.read()) is not grpc.aio.EOF:
            if req.HasField("request_headers"):
                await context.write(HEADERS)
            else:
                await context.write(self.body)
                return


async def main(port: int, endpoint: str) -> None:
    server = grpc.aio.server()
    pbg.add_ExternalProcessorServicer_to_server(Floor(endpoint), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
