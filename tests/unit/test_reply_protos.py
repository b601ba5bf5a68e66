"""The servicer's replies (`to_proto`, `_with_metadata`) are built field by field in place for speed; each
must serialize to the same bytes as the message built the plain way, with protobuf's own constructors
and `Struct.update`, which is how they were built before."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc.config import parse_config
from extproc.envoy.names import NAMESPACE
from extproc.envoy.server import _with_metadata, to_proto
from extproc.exchange import Action, Exchange
from extproc.ops.usage import Usage
from extproc.routing.gateway import Gateway

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
                                      append_action=OVERWRITE)


SET = [("content-length", "1834"), ("x-gateway-destination-endpoint", "10.0.0.2:8000"), ("x-note", "café")]
REMOVE = ("authorization", "x-api-key")
BODY = b'{"model":"llama-3","messages":[{"role":"user","content":"hi"}]}'


def test_request_body_reply_with_headers_set_and_removed_a_new_body_and_the_route_cleared() -> None:
    act = Action(set_headers=list(SET), remove_headers=REMOVE, body=BODY, clear_route_cache=True)
    expected = pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[option(k, v) for k, v in SET], remove_headers=REMOVE),
        body_mutation=pb.BodyMutation(body=BODY), clear_route_cache=True)))
    assert to_proto("request_body", act).SerializeToString() == expected.SerializeToString()


def test_response_headers_reply_with_headers_and_a_body_mode() -> None:
    act = Action(set_headers=[("content-type", "text/event-stream")], remove_headers=("content-length",),
                 response_body_mode="STREAMED")
    expected = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
            set_headers=[option("content-type", "text/event-stream")], remove_headers=["content-length"]))),
        mode_override=processing_mode_pb2.ProcessingMode(
            response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED))
    assert to_proto("response_headers", act).SerializeToString() == expected.SerializeToString()


def test_response_body_reply_that_clears_the_body() -> None:
    expected = pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[option("content-length", "0")]),
        body_mutation=pb.BodyMutation(clear_body=True))))
    act = Action(set_headers=[("content-length", "0")], body=b"")
    assert to_proto("response_body", act).SerializeToString() == expected.SerializeToString()


def test_immediate_reply_with_its_content_type_first_then_the_actions_headers() -> None:
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit_exceeded"}}).encode()
    act = Action(immediate=(429, body, "application/json"), set_headers=[("retry-after", "3"), ("x-note", "café")],
                 done=True)
    expected = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=429),
        headers=pb.HeaderMutation(set_headers=[option("content-type", "application/json"), option("retry-after", "3"),
                                               option("x-note", "café")]),
        body=body, details="llm_gateway_sidecar"))
    assert to_proto("request_body", act).SerializeToString() == expected.SerializeToString()


def plain_metadata(resp: pb.ProcessingResponse, meta: dict[str, Any]) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    out.CopyFrom(resp)
    out.dynamic_metadata.update({NAMESPACE: meta})
    return out


USAGE = Usage(1200, 400, 1024, 64).as_metadata()
NESTED: dict[str, Any] = {
    "model": "llama-3", "backend": "chat", "envoy_counts": True, "ratio": 0.25, "none": None, "empty": {},
    "route": {"cluster": "chat", "attempts": [{"host": "10.0.0.1:80", "status": 503}, {"host": "10.0.0.2:80"}],
              "tags": ["a", 1, False, [], {"deep": {"deeper": "x"}}]},
    **USAGE,
}


@pytest.mark.parametrize("meta", [USAGE, NESTED, {}], ids=["usage", "nested", "empty"])
@pytest.mark.parametrize("kind,act", [
    ("response_body", Action(done=True)),  # one of the shared replies, copied
    ("response_body", Action(set_headers=[("content-length", "17")], body=b'{"id":"resp_1"}  ', done=True)),
    ("request_body", Action(immediate=(400, b'{"error":{}}', "application/json"), done=True)),
], ids=["continue", "new-body", "immediate"])
def test_reply_with_dynamic_metadata(kind: str, act: Action, meta: dict[str, Any]) -> None:
    resp = to_proto(kind, act)
    shared = resp.SerializeToString()
    assert _with_metadata(resp, meta).SerializeToString() == plain_metadata(resp, meta).SerializeToString()
    assert resp.SerializeToString() == shared  # the reply it started from is left as it was


def test_a_translated_exchanges_last_reply_with_its_usage() -> None:
    gw = Gateway(parse_config("""
backends:
  - {name: chat, api: chat, models: ["llama-*"], endpoints: ["10.0.0.1:80"]}
""", env={}))
    ex = Exchange(gw, envoy_counts=True)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    ex.request_body(json.dumps({"model": "llama-3", "input": "hi"}).encode())
    ex.response_headers({":status": "200", "content-type": "application/json"})
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "llama-3",
              "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}],
              "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                        "prompt_tokens_details": {"cached_tokens": 4}}}
    act = ex.response_body(json.dumps(answer).encode(), True)
    meta = ex.metadata()
    assert act.done and meta is not None and meta["input_tokens"] == 11 and meta["cached_tokens"] == 4
    resp = to_proto("response_body", act)
    got = _with_metadata(resp, meta)
    assert got.SerializeToString() == plain_metadata(resp, meta).SerializeToString()
    fields = got.dynamic_metadata.fields[NAMESPACE].struct_value.fields
    assert fields["output_tokens"].number_value == 7 and fields["model"].string_value == "llama-3"
