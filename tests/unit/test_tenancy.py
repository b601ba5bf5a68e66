"""Tenants: who owns a stored conversation, and what another tenant sees (sans-IO, a dict as the store)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from extproc.config import ConfigError, Tenancy, parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange, Lookup, Phase
from extproc.routing.gateway import Gateway
from extproc.state import records as rec
from extproc.state.tenancy import ANONYMOUS, Tenants

SECRET = b"per-deployment-secret"
CFG = """
usage_accounting: translated
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["10.0.1.1:80"]
  - name: resp
    api: responses
    models: ["gpt-oss-*"]
    endpoints: ["10.0.0.1:80"]
    api_key_env: RESP_KEY  # the sidecar's own key: the backend cannot tell tenants apart
"""
ENV = {"RESP_KEY": "sk-gateway"}


def expected_tenant(credential: str) -> str:
    return "t" + hmac.new(SECRET, credential.encode(), hashlib.sha256).hexdigest()[:32]


@pytest.mark.parametrize(("headers", "credential"), [
    ({"authorization": "Bearer sk-alice"}, "sk-alice"),
    ({"authorization": "bearer   sk-alice "}, "sk-alice"),
    ({"x-api-key": "sk-bob"}, "sk-bob"),
    ({"authorization": "Basic abc", "x-api-key": "sk-bob"}, "sk-bob"),
])
def test_tenant_is_a_keyed_hash_of_the_credential(headers, credential):
    assert Tenants(Tenancy(), SECRET).tenant_of(headers) == expected_tenant(credential)


def test_no_credential_is_the_anonymous_tenant_and_the_secret_matters():
    t = Tenants(Tenancy(), SECRET)
    assert t.tenant_of({}) == t.tenant_of({"authorization": "Bearer "}) == ANONYMOUS
    assert Tenants(Tenancy(), b"other").tenant_of({"x-api-key": "k"}) != t.tenant_of({"x-api-key": "k"})


def test_a_configured_header_names_the_tenant_and_the_credential_is_ignored():
    t = Tenants(Tenancy(header="x-gateway-tenant"), SECRET)
    assert t.tenant_of({"x-gateway-tenant": "team-a", "authorization": "Bearer k"}) == expected_tenant("team-a")
    assert t.tenant_of({"authorization": "Bearer k"}) == ANONYMOUS


def test_tenancy_config_is_validated():
    cfg = parse_config(CFG + "tenancy: {header: x-gateway-tenant, secret_env: MY_SECRET}\n", env=ENV)
    assert cfg.tenancy == Tenancy(header="x-gateway-tenant", secret_env="MY_SECRET")
    with pytest.raises(ConfigError, match=r"tenancy\.header"):
        parse_config(CFG + "tenancy: {header: 'X Bad'}\n", env=ENV)


def run(step, store):
    while isinstance(step, Lookup):
        step = step.then([store.get(k) for k in step.keys])
    return step


def request(gw, path, body, key, method="POST"):
    ex = Exchange(gw)
    headers = {":method": method, ":path": path, "content-type": "application/json"}
    if key is not None:  # None: a caller with no credential at all
        headers["authorization"] = f"Bearer {key}"
    step = ex.request_headers(headers, body is None)
    if body is not None:
        step = ex.request_body(json.dumps(body).encode())
    return ex, step


@pytest.fixture
def gw():
    return Gateway(parse_config(CFG, env=ENV), tenant_secret=SECRET)


def test_a_held_turn_is_visible_only_to_its_tenant(gw):
    store = {rec.turn_key(expected_tenant("alice"), "r1"): rec.turn_record(
        {"id": "r1", "object": "response", "status": "completed", "output": []}, [], [], None)}
    _, step = request(gw, "/v1/responses/r1", None, "alice", "GET")
    assert run(step, store).immediate[0] == 200
    for method, path, body in (("GET", "/v1/responses/r1", None), ("DELETE", "/v1/responses/r1", None),
                               ("GET", "/v1/responses/r1/input_items", None),
                               ("POST", "/v1/responses", {"model": "llama-3", "input": "hi",
                                                          "previous_response_id": "r1"})):
        _, step = request(gw, path, body, "mallory", method)
        with pytest.raises(GatewayError) as e:
            run(step, store)
        assert e.value.status == 404, (method, path)


KEYLESS = CFG.replace("    api_key_env: RESP_KEY", "#")  # a vLLM or Ollama server: it checks no key
VOUCHING = KEYLESS.replace("#  # the sidecar's own key", "    authenticates_callers: true  # each caller's own key")


def continuing(rid: str) -> tuple[str, str, dict | None]:
    return "POST", "/v1/responses", {"model": "gpt-oss-1", "input": "hi", "previous_response_id": rid}


RESOURCE_CALLS = [("GET", "/v1/responses/r1", None), ("GET", "/v1/responses/r1/input_items", None),
                  ("DELETE", "/v1/responses/r1", None), ("POST", "/v1/responses/r1/cancel", None), continuing("r1")]


@pytest.mark.parametrize(("method", "path", "body"), RESOURCE_CALLS)
@pytest.mark.parametrize("caller", ["mallory", None])
def test_a_backend_that_checks_no_key_gets_no_id_the_sidecar_did_not_record(method, path, body, caller):
    """Alice's response on a keyless Responses instance: another tenant, or a caller with no key, finds no
    record of it under their own tenant, and the backend would serve anyone: the unknown id's 404."""
    gw = Gateway(parse_config(KEYLESS, env={}), tenant_secret=SECRET)
    store = {rec.pin_key(expected_tenant("alice"), "r1"): rec.Pin("resp", "10.0.0.1:80").dumps(),
             rec.owner_key("r1"): expected_tenant("alice").encode()}
    _, step = request(gw, path, body, caller, method)
    with pytest.raises(GatewayError) as e:
        run(step, store)
    assert e.value.status == 404 and e.value.code in ("response_not_found", "previous_response_not_found")
    with pytest.raises(GatewayError) as e:  # and so is an id nobody recorded
        run(request(gw, path.replace("r1", "r2"), body and {**body, "previous_response_id": "r2"}, caller, method)[1],
            store)
    assert e.value.status == 404
    _, step = request(gw, path, body, "alice", method)  # Alice's own record still routes her there
    assert dict(run(step, store).set_headers)["x-gateway-destination-endpoint"] == "10.0.0.1:80"


@pytest.mark.parametrize(("method", "path", "body"), RESOURCE_CALLS)
def test_a_backend_that_checks_each_caller_gets_unknown_ids_but_not_another_tenants(method, path, body):
    """Declared to authenticate each caller, the backend judges ids the sidecar never saw (placed by the
    ring); one recorded for another tenant is refused before it reaches the backend."""
    gw = Gateway(parse_config(VOUCHING, env={}), tenant_secret=SECRET)
    _, step = request(gw, path, body, "mallory", method)
    assert dict(run(step, {}).set_headers)["x-gateway-destination-endpoint"] == "10.0.0.1:80"
    ex, step = request(gw, path, body, "mallory", method)
    with pytest.raises(GatewayError) as e:
        run(step, {rec.owner_key("r1"): expected_tenant("alice").encode()})
    assert e.value.status == 404 and ex.pin_decision == "other_tenant"


def test_authenticates_callers_cannot_go_with_the_sidecars_own_key():
    with pytest.raises(ConfigError, match="authenticates_callers"):
        parse_config(CFG + "    authenticates_callers: true\n", env=ENV)


def test_a_pin_is_recorded_under_the_tenant_of_the_request(gw):
    ex, step = request(gw, "/v1/responses", {"model": "gpt-oss-1", "input": "hi"}, "alice")
    assert not run(step, {}).done
    ex.response_headers({":status": "200", "content-type": "application/json"})
    act = ex.response_body(b'{"id":"resp_9","object":"response"}', True)
    assert act.writes == [(f"pin:{expected_tenant('alice')}:resp_9", rec.Pin("resp", "10.0.0.1:80").dumps()),
                          ("owner:resp_9", expected_tenant("alice").encode())]


def test_phases_follow_envoys_messages(gw):
    ex = Exchange(gw)
    assert ex.phase is Phase.REQUEST
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"}, False)
    assert ex.phase is Phase.REQUEST_BODY
    with pytest.raises(RuntimeError, match="response_body in phase request_body"):
        ex.response_body(b"", True)
    run(ex.request_body(b'{"model": "gpt-oss-1", "input": "hi"}'), {})
    assert ex.phase is Phase.ROUTED
    ex.response_headers({":status": "200", "content-type": "application/json"})
    assert ex.phase is Phase.ANSWER
    ex.response_body(b'{"id":"resp_1"}', True)
    assert ex.phase is Phase.DONE


@pytest.mark.parametrize("config", [CFG, KEYLESS])
def test_an_item_reference_reaches_no_backend_that_cannot_tell_callers_apart(config):
    """The sidecar records no owner of item ids: on a backend holding the gateway's key, or checking no key,
    an item_reference could resolve another tenant's stored item. Refused naming the item."""
    gw = Gateway(parse_config(config, env=ENV), tenant_secret=SECRET)
    body = {"model": "gpt-oss-1", "input": [{"role": "user", "content": "hi"},
                                            {"type": "item_reference", "id": "msg_alices"}]}
    with pytest.raises(GatewayError) as e:
        run(request(gw, "/v1/responses", body, "mallory")[1], {})
    assert (e.value.status, e.value.param) == (400, "input[1]")
    _, step = request(Gateway(parse_config(VOUCHING, env={}), tenant_secret=SECRET), "/v1/responses", body, "mallory")
    assert not run(step, {}).done  # a backend that checks each caller resolves it itself
