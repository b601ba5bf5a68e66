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


@pytest.mark.parametrize("path", [
    "/v1/responses/", "/v1/chat/completions/", "/v1/models/", "/v1/responses/resp_1/", "/v1/responses/resp_1/cancel/",
    "/v1/responses/resp_1;x", "/v1/responses/resp%5F1", "/v1/responses/resp_1/other", "/v1/responses/compact/",
    "/v1/responses/input_tokens/", "/v1/responses;/resp_1", "/v1/responses;x", "/v1;a/responses", "/V1/responses/resp_1",
    "/v1/Responses", "/v1/CHAT/completions", "/v1/chat/completions;x", "/v1/models;x", "/v1/responses%2F",
    "/responses", "/responses/resp_1", "/chat/completions", "/openai/v1/responses/resp_1", "/api/v2/responses",
])
def test_another_spelling_of_a_sidecar_path_is_refused_not_passed_on(path):
    """An upstream may read these as the sidecar's own paths, which would skip its tenancy checks."""
    with pytest.raises(GatewayError) as e:
        check_request_line("GET", path + "?a=b", has_body=False)
    assert (e.value.status, e.value.code) == (404, "invalid_url")
    assert e.value.message == f"Invalid URL (GET {path})"


@pytest.mark.parametrize("path", ["/", "/v1/embeddings/", "/v1/files/f1/", "/v1/chat/completions/chatcmpl-1",
                                  "/v1/models/gpt-4o", "/healthz", "/v1/embeddings;x", "/V1/Embeddings",
                                  "/v1/responses/resp_ABC", "/v1/responses/RESP_1/input_items", "/v1/files/responses.jsonl",
                                  "/v1/chat/completions/chatcmpl-1/messages", "/chat/completions/chatcmpl-1"])
def test_other_paths_keep_passing_through_whatever_their_spelling(path):
    check_request_line("GET", path, has_body=False)


def _exchange(cfg: str = CFG) -> Exchange:
    return Exchange(Gateway(parse_config(cfg, env={})))


def _post(ex: Exchange, path: str, body: dict):
    ex.request_headers({":method": "POST", ":path": path, "content-type": "application/json"}, False)
    return ex.request_body(json.dumps(body).encode())


def test_input_token_counting_goes_to_a_responses_backend_untranslated():
    cfg = CFG + """
  - name: codex
    api: responses
    models: ["gpt-5*"]
    endpoints: ["127.0.0.1:8002"]
"""
    act = _post(ex := _exchange(cfg), "/v1/responses/input_tokens", {"model": "gpt-5", "input": "count me"})
    assert act.immediate is None and act.body is None  # the client's bytes, as sent
    assert ex.target is not None and ex.target.backend.name == "codex" and not ex.translated
    assert ":path" not in dict(act.set_headers)


def test_input_token_counting_on_a_chat_only_model_says_why_it_cannot():
    with pytest.raises(GatewayError) as e:
        _post(_exchange(), "/v1/responses/input_tokens", {"model": "llama-3", "input": "count me"})
    assert (e.value.status, e.value.code, e.value.param) == (400, "unsupported_api", "model")
    assert "/v1/chat/completions only" in e.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": [], "role": "user", "content": "hi"}]}, "input[0].type"),
    ({"input": [{"type": {}, "role": "user", "content": "hi"}]}, "input[0].type"),
    ({"input": "hi", "tools": [{"type": "custom", "name": "g", "format": "x"}]}, "tools[0].format"),
    ({"input": "hi", "tools": [{"type": "custom", "name": "g", "format": [None]}]}, "tools[0].format"),
    ({"input": "hi", "tools": [{"type": "function", "name": "g", "description": ["x"]}]}, "tools[0].description"),
])
def test_a_wrongly_typed_field_is_a_400_naming_it(body, param):
    with pytest.raises(GatewayError) as e:
        _post(_exchange(), "/v1/responses", {"model": "llama-3", **body})
    assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_value", param)


def test_a_shape_nothing_checked_for_is_the_clients_400_not_a_500(monkeypatch, caplog):
    """The net under the request side: whatever a check missed is answered as a client error, and
    logged with its traceback, including in code that runs after a store read."""
    from extproc.exchange.request import RequestSide
    from extproc.state.lookup import Lookup, Reads

    def broken(self, raw):
        yield Reads(("k",))
        return {}["missing"]

    monkeypatch.setattr(RequestSide, "on_body", broken)
    ex = _exchange()
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    step = ex.request_body(b"{}")
    assert isinstance(step, Lookup) and step.keys == ("k",)
    with pytest.raises(GatewayError) as e:
        step.then([None])
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert "KeyError" in e.value.message
    assert "request the sidecar could not use" in caplog.text and "Traceback" in caplog.text
