"""Micro-benchmarks of the sans-IO pieces (timeit): what one request costs before any I/O.

    .venv/bin/python benchmarks/micro.py [--only SUBSTRING]

Prints CPU microseconds per operation (best of five); writes benchmarks/results/micro.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402

from extproc.config import parse_config  # noqa: E402
from extproc.envoy.server import _headers, _with_metadata, to_proto  # noqa: E402
from extproc.exchange import Action, Exchange  # noqa: E402
from extproc.ops.metrics import Metrics  # noqa: E402
from extproc.ops.record import record  # noqa: E402
from extproc.routing.gateway import Gateway  # noqa: E402
from extproc.routing.ring import HashRing  # noqa: E402
from extproc.translate import (  # noqa: E402
    req_chat_to_responses,
    req_responses_to_chat,
    resp_chat_to_responses,
    resp_responses_to_chat,
    wire,
)
from extproc.translate.stream_chat_to_responses import ChatToResponsesStream  # noqa: E402
from extproc.translate.stream_responses_to_chat import ResponsesToChatStream  # noqa: E402

GW = Gateway(parse_config("""
usage_accounting: translated
backends:
  - {name: chat, api: chat, models: ["llama-*"], endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]}
  - {name: resp, api: responses, models: ["gpt-5.3-codex"], endpoints: ["10.0.1.1:80"]}
""", env={}))


def history(turns: int) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": "You are a careful assistant. " * 10}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}: " + "lorem ipsum dolor sit amet " * 12})
        msgs.append({"role": "assistant", "content": f"Answer {i}: " + "consectetur adipiscing elit " * 12})
    msgs.append({"role": "user", "content": "And now?"})
    return msgs


SMALL = {"model": "gpt-5.3-codex", "messages": history(1)}
LARGE = {"model": "gpt-5.3-codex", "messages": history(140)}  # about 100 KB
HEADERS = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers={"headers": [
    {"key": ":method", "raw_value": b"POST"}, {"key": ":path", "raw_value": b"/v1/chat/completions"},
    {"key": "content-type", "raw_value": b"application/json"}, {"key": "x-request-id", "raw_value": b"abc"}]}))
RAW_SMALL = json.dumps({"model": "llama-3", "messages": history(1)}).encode()


def passthrough_request() -> None:
    """What the servicer does for a pass-through request: two messages in, two replies out."""
    ex = Exchange(GW)
    req = pb.ProcessingRequest.FromString(HEADERS.SerializeToString())
    to_proto("request_headers", ex.request_headers(_headers(req.request_headers.headers), False)).SerializeToString()
    to_proto("request_body", ex.request_body(RAW_SMALL)).SerializeToString()


CHUNK = b"data: " + json.dumps({"id": "c", "created": 1, "model": "m", "choices": [
    {"index": 0, "delta": {"content": "hello world "}, "finish_reason": None}]}).encode() + b"\n\n"


def sse_events(n: int) -> None:
    s = ChatToResponsesStream({"model": "m", "stream": True})
    for _ in range(n):
        s.feed(CHUNK)


EVENT = b"event: response.output_text.delta\ndata: " + json.dumps({
    "type": "response.output_text.delta", "sequence_number": 7, "item_id": "msg_1", "output_index": 0,
    "content_index": 0, "delta": "hello world ", "logprobs": []}).encode() + b"\n\n"
CREATED = b"data: " + json.dumps({"type": "response.created", "sequence_number": 0, "response": {
    "id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": []}}).encode() \
    + b"\n\n"


def responses_events(n: int) -> None:
    s = ResponsesToChatStream({"model": "m", "stream": True}, "m")
    s.feed(CREATED)
    for _ in range(n):
        s.feed(EVENT)


ANSWER_TEXT = "The answer, at some length: " + "lorem ipsum dolor sit amet " * 60  # about 1.6 KB
USAGE = {"prompt_tokens": 1200, "completion_tokens": 400, "total_tokens": 1600,
         "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 0}}
CHAT_ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1733000000, "model": "llama-3",
               "system_fingerprint": "fp_1", "usage": USAGE, "choices": [{
                   "index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
                       "role": "assistant", "content": ANSWER_TEXT, "refusal": None, "tool_calls": [
                           {"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}]}
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1733000000, "status": "completed", "model": "gpt-5.3",
            "usage": {"input_tokens": 1200, "output_tokens": 400, "total_tokens": 1600,
                      "input_tokens_details": {"cached_tokens": 1024}, "output_tokens_details": {"reasoning_tokens": 64}},
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thinking it over."}]},
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [
                    {"type": "output_text", "text": ANSWER_TEXT, "annotations": [], "logprobs": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city": "Paris"}', "status": "completed"}]}
CHUNK_DATA = CHUNK[len(b"data: "):].strip()


def finished_stream() -> Exchange:
    """A translated stream (Responses client, chat backend) fed to its end: what the metrics read."""
    ex = Exchange(GW)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    ex.request_body(json.dumps({"model": "llama-3", "input": "hi", "stream": True}).encode())
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    end = [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
           {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}]
    for chunk in [CHUNK] * 18 + [b"data: " + json.dumps(e).encode() + b"\n\n" for e in end]:
        ex.response_body(chunk, False)
    ex.response_body(b"data: [DONE]\n\n", True)
    assert ex.usage is not None and ex.usage.output_tokens == 7, ex.usage
    return ex


TRANSLATED_REQUEST = json.dumps({"model": "llama-3", "input": "What is the weather in Paris?"}).encode()
CHAT_ANSWER_RAW = json.dumps(CHAT_ANSWER).encode()


def translated_exchange() -> None:
    """What the servicer does for a buffered translated exchange (Responses client, chat backend), gRPC's
    own work aside: four messages in, four replies out, the last with the access log's dynamic metadata."""
    ex = Exchange(GW, envoy_counts=True)
    steps = (("request_headers", lambda: ex.request_headers(
                 {":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)),
             ("request_body", lambda: ex.request_body(TRANSLATED_REQUEST)),
             ("response_headers", lambda: ex.response_headers({":status": "200", "content-type": "application/json"})),
             ("response_body", lambda: ex.response_body(CHAT_ANSWER_RAW, True)))
    for kind, step in steps:
        act = step()
        assert isinstance(act, Action), act
        resp = to_proto(kind, act)
        if act.done and (meta := ex.metadata()) is not None:
            resp = _with_metadata(resp, meta)
        resp.SerializeToString()
    assert act.done and ex.usage is not None, ex.usage


METRICS, STREAM = Metrics(), finished_stream()
ROUTED = Action(set_headers=[("content-length", "1834"), ("x-gateway-destination-endpoint", "10.0.0.2:80"),
                             ("x-gateway-upstream-api", "chat")], body=b"{}", clear_route_cache=True)
LAST_REPLY, LAST_METADATA = to_proto("response_body", Action(done=True)), STREAM.metadata() or {}
CHUNK_MESSAGE = pb.ProcessingRequest(response_body=pb.HttpBody(body=CHUNK)).SerializeToString()


def streamed_chunks(n: int) -> None:
    """What the servicer does for each chunk of a translated stream (Responses client, chat backend),
    gRPC's own work aside: Envoy's message decoded, the exchange's step, the reply built and encoded."""
    ex = Exchange(GW)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    ex.request_body(json.dumps({"model": "llama-3", "input": "hi", "stream": True}).encode())
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    for _ in range(n):
        body = pb.ProcessingRequest.FromString(CHUNK_MESSAGE).response_body
        to_proto("response_body", ex.response_body(body.body, body.end_of_stream)).SerializeToString()


def stream_metrics() -> None:
    """Everything the metrics cost one translated stream: 23 Envoy messages timed, then recorded."""
    timer = METRICS.timer()
    for kind in ("request_headers", "request_body", "response_headers"):
        timer.message(kind, 1.0, 1.0001)
    for i in range(20):
        timer.message("response_body", 1.0 + i, 1.00005 + i)
    record(STREAM, METRICS, timer, GW.classifier.label_for)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="only the operations whose name contains this")
    args = ap.parse_args()
    ring = HashRing([(f"10.0.0.{i}:8000", 1) for i in range(16)])
    resp_large = req_chat_to_responses.translate_request(LARGE)
    resp_large["model"] = "llama-3"
    cases = {
        "request chat->responses, small": lambda: req_chat_to_responses.translate_request(SMALL),
        "request chat->responses, 100 KB history": lambda: req_chat_to_responses.translate_request(LARGE),
        "request responses->chat, 100 KB history": lambda: req_responses_to_chat.translate_request(resp_large),
        "SSE chat chunk -> Responses events, per chunk": lambda: sse_events(100),
        "SSE chat chunk -> Responses events, per chunk of 2,000": lambda: sse_events(2000),
        "SSE Responses event -> chat chunks, per event": lambda: responses_events(100),
        "streamed chunk through the servicer's path, per chunk": lambda: streamed_chunks(100),
        "buffered chat.completion (1.6 KB) -> Response": lambda: resp_chat_to_responses.translate_response(
            CHAT_ANSWER, {"model": "llama-3"}, "resp_1"),
        "buffered Response (1.6 KB) -> chat.completion": lambda: resp_responses_to_chat.translate_response(
            RESPONSE, "m"),
        "one chat chunk: orjson.loads alone (no checks)": lambda: orjson.loads(CHUNK_DATA),
        "one chat chunk: typed decode, every field checked": lambda: wire.decode(CHUNK_DATA, wire.ChatChunk, "event"),
        "ring lookup (16 endpoints x 160 vnodes)": lambda: ring.lookup("user-1234"),
        "pass-through request through the exchange + protos": passthrough_request,
        "translated exchange (buffered) through the exchange + protos": translated_exchange,
        "reply with three headers set (to_proto)": lambda: to_proto("request_body", ROUTED),
        "last reply with the access log's metadata (_with_metadata)": lambda: _with_metadata(LAST_REPLY, LAST_METADATA),
        "metrics of one translated stream (23 messages)": stream_metrics,
    }
    per = {"SSE chat chunk -> Responses events, per chunk": 100, "SSE chat chunk -> Responses events, per chunk of 2,000": 2000,
           "SSE Responses event -> chat chunks, per event": 100, "streamed chunk through the servicer's path, per chunk": 100}
    results = {}
    print(f"{'operation':55} {'us/op':>10}")
    for name, fn in cases.items():
        if args.only not in name:
            continue
        timer = timeit.Timer(fn, timer=time.process_time)  # CPU time: other processes' load drops out
        n, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=n)) / n / per.get(name, 1) * 1e6
        results[name] = round(best, 2)
        print(f"{name:55} {best:10.2f}")
    print(f"\n(100 KB history: {len(json.dumps(LARGE)) // 1024} KB of JSON)")
    if args.only:
        return 0
    out = REPO / "benchmarks" / "results" / "micro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
