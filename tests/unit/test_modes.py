"""Model-mode discovery and learning: /v1/models parsing, rejection classification, resolution order."""

from __future__ import annotations

import json

import pytest

from extproc.api import CHAT, RESPONSES
from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import BUFFERED, Exchange, Lookup
from extproc.routing.classify import Classifier
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge, Learned, parse_models, rejection_needs


def test_parse_models():
    got = parse_models({"object": "list", "data": [
        {"id": "a", "supported_endpoints": ["/v1/responses"]},
        {"id": "b", "supported_endpoints": ["/v1/chat/completions", "/v1/responses"]},
        {"id": "c", "supported_endpoints": ["/chat/completions"]},
        {"id": "d", "mode": "responses"},
        {"id": "e", "owned_by": "vllm"},
        {"no": "id"}, "junk"]})
    assert got == {"a": "responses", "b": "both", "c": "chat", "d": "responses", "e": None}
    assert parse_models("nope") == {}


def err(message: str, **extra) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", **extra}}).encode()


# (status, body, the API that was tried, the API the rejection says is needed)
REJECTIONS = [
    # OpenAI
    (400, err("This model is only supported in v1/responses and not in v1/chat/completions.", param="model"), CHAT, RESPONSES),
    # Azure OpenAI
    (400, err("The chatCompletion operation does not work with the specified model, gpt-5-codex. Please choose "
              "different model and try again.", code="OperationNotSupported"), CHAT, RESPONSES),
    (400, err("The responses operation does not work with the specified model, gpt-4. Please choose different "
              "model and try again.", code="OperationNotSupported"), RESPONSES, CHAT),
    # GitHub Copilot
    (400, err("model gpt-5-codex is not accessible via the /chat/completions endpoint", code="unsupported_api_for_model"),
     CHAT, RESPONSES),
    # a gateway that names the other path
    (400, err("Model o3-pro is not supported on /v1/chat/completions. Use /v1/responses."), CHAT, RESPONSES),
    (422, err("The model x is not supported with the Responses API."), RESPONSES, CHAT),
    # vLLM / Ollama without the endpoint at all
    (404, b'{"detail":"Not Found"}', RESPONSES, CHAT),
    (404, b"404 page not found", RESPONSES, CHAT),
    (405, b'{"detail":"Method Not Allowed"}', CHAT, RESPONSES),
]
NOT_ABOUT_THE_API = [
    (404, b'{"object":"error","message":"The model `foo` does not exist.","type":"NotFoundError","code":404}', CHAT),
    (404, b'{"error":"model \\"x\\" not found, try pulling it first"}', RESPONSES),
    (400, err("Invalid value for 'temperature': expected a number"), CHAT),
    (400, err("Your request was rejected as a result of our safety system."), RESPONSES),
    (401, err("This model is only supported in v1/responses"), CHAT),
    (403, err("use /v1/responses"), CHAT),
    (429, err("Rate limit reached; use /v1/responses"), CHAT),
    (500, err("only supported in v1/responses"), CHAT),
    (400, err("This model is only supported in v1/responses"), RESPONSES),  # already there: not this
]


@pytest.mark.parametrize(("status", "body", "tried", "needs"), REJECTIONS)
def test_rejections_that_name_the_other_api(status, body, tried, needs):
    assert rejection_needs(status, body, tried) == needs


@pytest.mark.parametrize(("status", "body", "tried"), NOT_ABOUT_THE_API)
def test_other_errors_are_never_learned(status, body, tried):
    assert rejection_needs(status, body, tried) is None


CFG = """
discovery: {allow_mode_header: true}
usage_accounting: translated
backends:
  - name: up
    api: auto
    models: ["*"]
    endpoints: ["127.0.0.1:9"]
model_rules:
  - {match: "ruled", mode: chat}
"""


def test_resolution_order():
    knowledge = Knowledge()
    c = Classifier(parse_config(CFG, env={}), knowledge)
    assert (c.resolve("fresh").mode, c.resolve("fresh").learning) == ("auto", True)
    assert c.resolve("gpt-5.3-codex").source.startswith("built-in catalogue")
    knowledge.discovered["up"] = {"gpt-5.3-codex": "both", "listed": "chat", "ruled": "responses"}
    assert c.resolve("gpt-5.3-codex").mode == "both"  # the upstream's list beats the catalogue
    learned = Learned(mode=RESPONSES)
    assert c.resolve("listed", learned=learned).mode == RESPONSES  # learned beats the list
    assert c.resolve("ruled", learned=learned).mode == CHAT  # rules beat everything learned
    assert c.resolve("ruled", learned=learned, override="both").mode == "both"  # the header beats rules
    assert not c.resolve("listed").learning


def exchange(gw: Gateway, path: str, body: dict) -> tuple[Exchange, object]:
    ex = Exchange(gw)
    ex.request_headers({":method": "POST", ":path": path, "content-type": "application/json"}, False)
    return ex, ex.request_body(json.dumps(body).encode())


def test_learning_flow():
    gw = Gateway(parse_config(CFG, env={}))
    ex, step = exchange(gw, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert isinstance(step, Lookup) and step.keys == ("mode:up:m",)
    act = step.then([None])
    assert act.body is None and not act.done  # sent as is, the answer watched
    assert ex.response_headers({":status": "400", "content-type": "application/json"}).response_body_mode == BUFFERED
    out = ex.response_body(err("This model is only supported in v1/responses and not in v1/chat/completions."), True)
    body = json.loads(out.body)["error"]
    assert body["code"] == "model_api_learned" and "retry" in body["message"]
    assert out.writes == [("mode:up:m", Learned(RESPONSES).dumps())] and out.write_ttl == 86400
    # The same replica now translates at once, without asking the store.
    _, act = exchange(gw, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert dict(act.set_headers)[":path"] == "/v1/responses"


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def test_success_is_recorded_once_and_other_errors_pass():
    gw = Gateway(parse_config(CFG, env={}))
    ex, step = exchange(gw, "/v1/chat/completions", CHAT_BODY)
    step.then([None])
    act = ex.response_headers({":status": "200", "content-type": "application/json"})
    assert act.done and act.writes == [("mode:up:m", Learned(None, {CHAT}).dumps())]
    _, act = exchange(gw, "/v1/chat/completions", CHAT_BODY)
    assert act.done  # known to answer on chat: no watching, no store
    ex, act = exchange(gw, "/v1/responses", {"model": "m", "input": "x"})
    assert not act.done  # responses not known yet
    ex.response_headers({":status": "400", "content-type": "application/json"})
    out = ex.response_body(err("Invalid value for 'temperature'"), True)
    assert out.done and out.body is None and out.writes == []


def test_mode_header_only_when_allowed():
    gw = Gateway(parse_config(CFG.replace("allow_mode_header: true", "allow_mode_header: false"), env={}))
    ex = Exchange(gw)
    ex.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
                        "x-gateway-model-mode": "responses"}, False)
    act = ex.request_body(json.dumps({"model": "ruled", "messages": [{"role": "user", "content": "x"}]}).encode())
    act = act.then([None]) if isinstance(act, Lookup) else act
    assert ":path" not in dict(act.set_headers) and "x-gateway-model-mode" in act.remove_headers
    with pytest.raises(GatewayError):
        exchange(gw, "/v1/chat/completions", {"model": ""})


def test_a_rejection_compressed_for_the_client_is_learned_and_sent_plain():
    import gzip

    gw = Gateway(parse_config(CFG, env={}))
    ex, step = exchange(gw, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert isinstance(step, Lookup)
    step.then([None])
    ex.response_headers({":status": "400", "content-type": "application/json", "content-encoding": "gzip"})
    out = ex.response_body(gzip.compress(err("This model is only supported in v1/responses and not in "
                                             "v1/chat/completions.")), True)
    assert json.loads(out.body)["error"]["code"] == "model_api_learned"  # plain JSON, and labelled so
    assert "content-encoding" in out.remove_headers
    assert out.writes == [("mode:up:m", Learned(RESPONSES).dumps())]
