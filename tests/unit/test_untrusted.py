"""What crosses the wire is checked before it is used (sans-IO): request lines, media types, answers
without a body."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError, upstream_error_payload
from extproc.exchange import Exchange, error_action
from extproc.exchange.body import is_json
from extproc.exchange.paths import allowed_methods, check_request_line
from extproc.routing.gateway import Gateway

CFG = """
backends:
  - name: vllm
    api: chat
    models: ["llama-*"]
    endpoints: ["127.0.0.1:8001"]
"""


@pytest.mark.parametrize(("path", "allowed"), [
    ("/v1/chat/completions", ("POST",)), ("/v1/responses?x=1", ("POST",)), ("/v1/models", ("GET",)),
    ("/v1/responses/resp_1", ("GET", "DELETE")), ("/v1/responses/resp_1/cancel", ("POST",)),
    ("/v1/responses/resp_1/input_items?limit=2", ("GET",)), ("/v1/responses/compact", ("POST",)),
    ("/v1/embeddings", None), ("/v1/models/gpt-4o", None), ("/v1/audio/speech", None), ("/healthz", None),
])
def test_the_sidecar_handles_exactly_its_own_paths(path, allowed):
    assert allowed_methods(path) == allowed


def test_a_wrong_method_is_a_405_that_says_what_is_allowed():
    with pytest.raises(GatewayError) as e:
        check_request_line("GET", "/v1/responses/resp_1/cancel", has_body=False)
    act = error_action(e.value)
    assert act.immediate is not None and act.immediate[0] == 405
    assert dict(act.set_headers) == {"allow": "POST"}
    assert json.loads(act.immediate[1])["error"]["code"] == "method_not_allowed"


def test_an_api_post_needs_a_body_but_other_paths_do_not():
    with pytest.raises(GatewayError) as e:
        check_request_line("POST", "/v1/chat/completions", has_body=False)
    assert (e.value.status, e.value.code) == (400, "missing_body")
    check_request_line("POST", "/v1/responses/resp_1/cancel", has_body=False)
    check_request_line("POST", "/v1/embeddings", has_body=False)
    check_request_line("PATCH", "/v1/files/f1", has_body=True)


@pytest.mark.parametrize(("ctype", "ok"), [
    ("application/json", True), ("Application/JSON", True), ("application/json; charset=UTF-8", True),
    ('application/json;charset="utf-8"', True), ("application/merge-patch+json", True),
    ("text/not-json-really", False), ("application/jsonx", False), ("application/json; charset=iso-8859-1", False),
    ("json", False), ("", False), ("text/json", False),
])
def test_media_types_are_parsed(ctype, ok):
    assert is_json(ctype) is ok


@pytest.mark.parametrize(("status", "expected"), [("200", 502), ("204", 502), ("503", 503)])
def test_a_translated_answer_without_a_body_is_an_error_in_the_clients_shape(status, expected):
    ex = Exchange(Gateway(parse_config(CFG, env={})))
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    ex.request_body(json.dumps({"model": "llama-3", "input": "hi"}).encode())
    with pytest.raises(GatewayError) as e:
        ex.response_headers({":status": status, "content-type": "application/json"}, end_of_stream=True)
    assert e.value.status == expected
    assert e.value.code == ("bad_upstream_response" if expected == 502 else None)


def test_an_upstream_error_body_of_any_depth_keeps_only_its_strings():
    deep = b"[" * 1000 + b"]" * 1000  # orjson reads it; Python's repr of it would recurse too deep
    body = b'{"error": {"message": "no", "type": ' + deep + b', "code": ' + deep + b"}}"
    assert upstream_error_payload(400, body) == {"message": "no", "type": "invalid_request_error", "param": None,
                                                 "code": None}
