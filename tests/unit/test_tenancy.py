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
    headers = {":method": method, ":path": path, "content-type": "application/json", "authorization": f"Bearer {key}"}
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


def test_a_backend_that_sees_the_clients_own_key_gets_unknown_ids():
    """Without an injected key the backend tells tenants apart itself: unknown ids go to it by the ring."""
    gw = Gateway(parse_config(CFG.replace("    api_key_env: RESP_KEY", "#"), env={}), tenant_secret=SECRET)
    _, step = request(gw, "/v1/responses/r1", None, "mallory", "GET")
    assert dict(run(step, {}).set_headers)["x-gateway-destination-endpoint"] == "10.0.0.1:80"


def test_a_pin_is_recorded_under_the_tenant_of_the_request(gw):
    ex, step = request(gw, "/v1/responses", {"model": "gpt-oss-1", "input": "hi"}, "alice")
    assert not run(step, {}).done
    ex.response_headers({":status": "200", "content-type": "application/json"})
    act = ex.response_body(b'{"id":"resp_9","object":"response"}', True)
    assert [k for k, _ in act.writes] == [f"pin:{expected_tenant('alice')}:resp_9"]


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
