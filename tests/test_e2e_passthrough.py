"""End to end: pass-through is byte-for-byte, bad input is answered clearly, routing cannot be spoofed."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading

import pytest


def post(gw, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_same_api_passes_bytes_through_untouched(gw):
    body = b'{"model": "llama-3",   "messages": [{"role": "user", "content": "exact \\u00e9 bytes"}] ,"temperature":0.10}'
    status, _ = post(gw, "/v1/chat/completions", body)
    assert status == 200
    assert gw.chat.last["raw"] == body  # odd spacing, escapes and number spellings survive
    assert gw.chat.last["headers"]["content-length"] == str(len(body))
    r = gw.client().responses.create(model="gpt-5.3-codex", input="hi", store=False)
    assert r.output_text == "echo: hi"
    assert gw.resp.last["body"] == {"model": "gpt-5.3-codex", "input": "hi", "store": False}


def test_other_paths_pass_through(gw):
    out = gw.client().embeddings.create(model="text-embedding-small", input="hello")
    assert out.data[0].embedding == [0.5]
    assert gw.chat.last["path"] == "/v1/embeddings"


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/responses", b'{"model": "llama-3", "input": "x"', 400, "invalid_json"),
    ("/v1/responses", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
    ("/v1/responses", b'{"model": "llama-3", "input": 5}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}',
     400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": [{"type": "hologram"}]}', 400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": []}', 400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": "x", "max_output_tokens": "ten"}', 400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": "x", "tools": {"type": "function"}}', 400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": "x", "temperature": "hot", "stream": "yes"}', 400, "invalid_value"),
    ("/v1/responses", b'{"model": "llama-3", "input": "x", "instructions": 7}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": "hi"}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": []}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": [{"role": "tool", "tool_call_id": "nope", '
                             b'"content": "x"}]}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": "x"}], '
                             b'"max_tokens": -1}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": 5}]}', 400,
     "invalid_value"),
    ("/v1/chat/completions", b'{"model": "llama-3", "model": "gpt-5.3-codex", "messages": []}', 400, "duplicate_key"),
    ("/v1/chat/completions", b'{"model": "llama-3", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
     .replace(b"\\xff\\xfe", b"\xff\xfe"), 400, "invalid_json"),
    ("/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000, 400, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "llama-3", "messages": [], "max_tokens": 1' + b"0" * 400 + b"}", 400,
     "invalid_json"),
    ("/v1/chat/completions", b'{"model": "llama-3", "messages": [], "n": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
     "invalid_json"),
])
def test_bad_input_answered_clearly(gw, path, body, status, code):
    got, raw = post(gw, path, body)
    assert got == status, raw
    err = json.loads(raw)["error"]
    assert err["code"] == code and err["message"]
    assert not gw.chat.requests and not gw.resp.requests
    # and the sidecar keeps serving
    assert gw.client().chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "ok?"}]).choices


def test_client_routing_headers_are_ignored(gw):
    """A client naming another host in the routing headers never reaches it."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    hits: list[int] = []

    def accept() -> None:
        trap.settimeout(3)
        try:
            conn, _ = trap.accept()
            hits.append(1)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    trap_addr = f"127.0.0.1:{trap.getsockname()[1]}"
    body = b'{"model": "llama-3", "messages": [{"role": "user", "content": "spoof"}]}'
    status, _ = post(gw, "/v1/chat/completions", body, {"x-gateway-destination-endpoint": trap_addr,
                                                        "x-gateway-backend": "codex", "x-gateway-cluster": "openai"})
    assert status == 200
    assert gw.chat.last["body"]["messages"][0]["content"] == "spoof"
    t.join()
    trap.close()
    assert not hits


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({"content-type": ""}, 415, "unsupported_media_type"),
    ({"content-encoding": "gzip"}, 415, "unsupported_content_encoding"),
])
def test_bad_headers_answered_clearly(gw, headers, status, code):
    got, raw = post(gw, "/v1/chat/completions", b'{"model": "llama-3", "messages": []}', headers)
    assert got == status, raw
    assert json.loads(raw)["error"]["code"] == code


@pytest.mark.parametrize(("size", "code"), [
    (50 * 1024 * 1024, "request_too_large"),  # above the sidecar's limit (48 MiB): its own answer
    (70 * 1024 * 1024, "request_payload_too_large"),  # above Envoy's buffer (64 MiB): Envoy's, in the same shape
])
def test_oversized_bodies_get_a_clear_413(gw, size, code):
    body = b'{"model": "llama-3", "messages": [{"role": "user", "content": "' + b"x" * size + b'"}]}'
    status, raw = post_watching(gw, "/v1/chat/completions", body)
    assert status == 413
    err = json.loads(raw)["error"]
    assert err["code"] == code and err["message"]


def post_watching(gw, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A POST whose client reads while it sends, as RFC 9112 9.6 asks of one sending a large body: Envoy
    answers a body over its buffer before the body has arrived and may stop reading it, so a client that
    only reads once it has sent everything may meet a reset instead of the answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n").encode()

        def send() -> None:
            with contextlib.suppress(OSError):  # the answer came first and the connection is closing
                s.sendall(head + body)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        resp = http.client.HTTPResponse(s)
        resp.begin()
        out = resp.status, resp.read()
    sender.join(timeout=30)
    return out


def test_large_bodies_pass_both_ways(gw):
    """A 40 MB request (several images' worth) is routed, translated and answered: no 4 MiB gRPC limit."""
    big = "x" * (40 * 1024 * 1024)
    r = gw.client(timeout=120).responses.create(model="llama-3", input=big)
    assert r.output_text.startswith("echo: xxx") and len(r.output_text) > 40 * 1024 * 1024
