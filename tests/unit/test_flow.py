"""The per-request state machine: which phases Envoy is asked for, what is rewritten (sans-IO)."""

from __future__ import annotations

import gzip
import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import BUFFERED, STREAMED, Exchange
from extproc.routing.gateway import Gateway

CFG = """
backends:
  - name: vllm
    api: chat
    models: ["llama-*"]
    endpoints: ["127.0.0.1:8001", "127.0.0.1:8002"]
  - name: openai
    api: responses
    models: ["gpt-5.3-codex"]
    cluster: openai
    path_prefix: /proxy
"""


@pytest.fixture(scope="module")
def gateway():
    return Gateway(parse_config(CFG, env={}))


def start(gateway, path: str, body: dict | bytes, **headers: str):
    ex = Exchange(gateway)
    act = ex.request_headers({":method": "POST", ":path": path, "content-type": "application/json", **headers}, False)
    assert act.body is None and not act.done
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ex, ex.request_body(raw)


def test_same_api_is_routed_and_released():
    lean = Gateway(parse_config(CFG + "usage_accounting: translated\n", env={}))
    _ex, act = start(lean, "/v1/chat/completions", {"model": "llama-3", "messages": [], "user": "u"})
    assert act.done and act.body is None and act.clear_route_cache
    headers = dict(act.set_headers)
    assert headers["x-gateway-destination-endpoint"] in ("127.0.0.1:8001", "127.0.0.1:8002")
    assert ":path" not in headers
    assert "x-gateway-cluster" in act.remove_headers


def test_placement_is_stable_for_a_key(gateway):
    picks = {dict(start(gateway, "/v1/chat/completions",
                        {"model": "llama-3", "messages": [], "prompt_cache_key": "s1"})[1].set_headers)
             ["x-gateway-destination-endpoint"] for _ in range(20)}
    assert len(picks) == 1


def test_chat_client_to_responses_model(gateway):
    ex, act = start(gateway, "/v1/chat/completions",
                    {"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": "hi"}]})
    headers = dict(act.set_headers)
    assert headers[":path"] == "/proxy/v1/responses" and headers["x-gateway-cluster"] == "openai"
    assert headers["accept-encoding"] == "identity"
    assert json.loads(act.body)["input"] == [{"type": "message", "role": "user", "content": "hi"}]
    assert headers["content-length"] == str(len(act.body))
    assert not act.done
    resp = ex.response_headers({":status": "200", "content-type": "application/json", "content-length": "10"})
    assert resp.response_body_mode == BUFFERED and "content-length" in resp.remove_headers
    out = ex.response_body(json.dumps({"id": "resp_1", "status": "completed", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "yo"}]}]}).encode(), True)
    assert out.done and json.loads(out.body)["choices"][0]["message"]["content"] == "yo"


def test_streamed_translation_and_gzip(gateway):
    ex, _ = start(gateway, "/v1/responses", {"model": "llama-3", "input": "hi", "stream": True})
    act = ex.response_headers({":status": "200", "content-type": "text/event-stream", "content-encoding": "gzip"})
    assert act.response_body_mode == STREAMED and "content-encoding" in act.remove_headers
    chunk = {"id": "c", "created": 1, "model": "llama-3",
             "choices": [{"index": 0, "delta": {"content": "hey"}, "finish_reason": "stop"}]}
    data = gzip.compress(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
    first = ex.response_body(data[:10], False)
    assert not first.done
    last = ex.response_body(data[10:], True)
    assert last.done and b"response.completed" in first.body + last.body


def test_upstream_error_in_client_shape(gateway):
    ex, _ = start(gateway, "/v1/responses", {"model": "llama-3", "input": "hi", "stream": True})
    act = ex.response_headers({":status": "400", "content-type": "application/json"})
    assert act.response_body_mode == BUFFERED
    out = ex.response_body(b'{"object":"error","message":"too long","type":"BadRequestError","code":400}', True)
    assert json.loads(out.body)["error"]["message"] == "too long"


def test_non_json_success_is_a_502(gateway):
    ex, _ = start(gateway, "/v1/responses", {"model": "llama-3", "input": "hi"})
    ex.response_headers({":status": "200", "content-type": "text/html"})
    with pytest.raises(GatewayError) as e:
        ex.response_body(b"<html>", True)
    assert e.value.status == 502


def test_models_list_is_answered_by_the_sidecar(gateway):
    ex = Exchange(gateway)
    act = ex.request_headers({":method": "GET", ":path": "/v1/models"}, True)
    assert act.immediate[0] == 200
    models = {m["id"]: m for m in json.loads(act.immediate[1])["data"]}
    assert models["gpt-5.3-codex"]["mode"] == "responses"


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b"{", {}, 400), (b"[]", {}, 400), (b"{}", {}, 400), (b'{"model":"nope"}', {}, 404),
    (b'{"model":"llama-3"}', {"content-encoding": "gzip"}, 415),
])
def test_bad_requests(gateway, body, headers, status):
    with pytest.raises(GatewayError) as e:
        start(gateway, "/v1/chat/completions", body, **headers)
    assert e.value.status == status


def test_body_over_the_limit_is_413():
    gw = Gateway(parse_config(CFG + "limits: {max_body_bytes: 2048}\n", env={}))
    with pytest.raises(GatewayError) as e:
        start(gw, "/v1/chat/completions", {"model": "llama-3", "messages": [{"role": "user", "content": "x" * 3000}]})
    assert e.value.status == 413


def test_same_api_answer_is_watched_for_usage_only(gateway):
    ex, act = start(gateway, "/v1/chat/completions", {"model": "llama-3", "stream": True, "user": "u",
                                                      "messages": [{"role": "user", "content": "hello there"}]})
    assert not act.done and act.body is None
    act = ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    assert act.response_body_mode == STREAMED and not act.set_headers and not act.remove_headers
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    first = ex.response_body(b"data: " + json.dumps(chunk).encode() + b"\n\n", False)
    assert first.body is None and not first.done  # bytes untouched
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
    last = ex.response_body(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n", True)
    assert last.done and last.body is None
    assert ex.metadata() == {"model": "llama-3", "client_api": "chat", "upstream_api": "chat", "backend": "vllm",
                             "input_tokens": 7, "output_tokens": 2, "cached_tokens": 0, "reasoning_tokens": 0,
                             "usage_estimated": False}


def test_missing_usage_is_estimated(gateway):
    ex, _ = start(gateway, "/v1/chat/completions", {"model": "llama-3", "messages": [{"role": "user", "content": "x" * 40}]})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    ex.response_body(json.dumps({"choices": [{"message": {"role": "assistant", "content": "y" * 20}}]}).encode(), True)
    assert (ex.usage.input_tokens, ex.usage.output_tokens, ex.usage.estimated) == (10, 5, True)


def test_a_translator_that_cannot_read_the_answer_gives_a_502_not_a_500(gateway, monkeypatch):
    ex, _ = start(gateway, "/v1/chat/completions", {"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": "hi"}]})
    ex.response_headers({":status": "200", "content-type": "application/json"})
    monkeypatch.setattr("extproc.translate.resp_responses_to_chat.translate_response",
                        lambda doc, model: doc["output"][0]["missing"])  # a KeyError deep in a translator
    with pytest.raises(GatewayError) as e:
        ex.response_body(b'{"id": "resp_1", "output": [{}]}', True)
    assert (e.value.status, e.value.code) == (502, "bad_upstream_response")


def test_a_stream_translator_that_fails_mid_stream_still_ends_the_stream(gateway, monkeypatch):
    ex, _ = start(gateway, "/v1/responses", {"model": "llama-3", "input": "hi", "stream": True})
    ex.response_headers({":status": "200", "content-type": "text/event-stream"})
    handler = ex.handler
    monkeypatch.setattr(handler.translator, "_event", lambda data: 1 / 0)
    act = ex.response_body(b'data: {"choices": []}\n\n', False)
    events = [json.loads(line[6:]) for line in act.body.decode().splitlines() if line.startswith("data: {")]
    assert act.done and events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "bad_upstream_response"


KEYED = CFG + """  - name: keyed
    api: chat
    models: ["keyed-*"]
    endpoints: ["127.0.0.1:8003"]
    api_key_env: KEYED_KEY
"""


def test_a_pass_through_read_only_for_its_usage_is_left_to_envoy():
    """The client's exchange lets go at the request body and marks its entry for Envoy's access-log
    service; an exchange that reads the answer whole anyway (a keyed backend's) counts it itself, and
    an upstream filter's exchange (envoy_counts=False) always does."""
    gw = Gateway(parse_config(KEYED, env={"KEYED_KEY": "sk-k"}))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    ex = Exchange(gw, envoy_counts=True)
    ex.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}, False)
    act = ex.request_body(json.dumps({"model": "llama-3", **chat}).encode())
    assert act.done and ex.counted_by_envoy
    assert ex.metadata() == {"model": "llama-3", "client_api": "chat", "upstream_api": "chat", "backend": "vllm",
                             "envoy_counts": True}
    keyed = Exchange(gw, envoy_counts=True)
    keyed.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}, False)
    assert not keyed.request_body(json.dumps({"model": "keyed-1", **chat}).encode()).done
    keyed.response_headers({":status": "200", "content-type": "application/json"})
    keyed.response_body(json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}).encode(), True)
    assert not keyed.counted_by_envoy and keyed.usage.input_tokens == 4 and "envoy_counts" not in keyed.metadata()
    _, act = start(gw, "/v1/chat/completions", {"model": "llama-3", **chat})  # envoy_counts=False
    assert not act.done


def test_a_stored_response_left_to_envoy_is_read_only_until_its_id():
    gw = Gateway(parse_config(CFG, env={}))
    ex = Exchange(gw, envoy_counts=True)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    assert not ex.request_body(json.dumps({"model": "gpt-5.3-codex", "input": "hi", "stream": True}).encode()).done
    assert ex.response_headers({":status": "200", "content-type": "text/event-stream"}).response_body_mode == STREAMED
    created = {"type": "response.created", "response": {"id": "resp_7", "status": "in_progress", "output": []}}
    act = ex.response_body(b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n", False)
    assert act.done and {key for key, _ in act.writes} == {"pin:anonymous:resp_7", "owner:resp_7"}  # before it goes on
    assert ex.counted_by_envoy and ex.usage is None and ex.metadata()["envoy_counts"] is True
