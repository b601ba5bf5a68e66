"""A backend that cannot serve yet (its key variable unset, its `dns:` name not resolving) does not stop
the sidecar: the config loads with a warning, and that backend's requests get a 503 naming why."""

from __future__ import annotations

import json

import pytest

from extproc.cli import main
from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange, Lookup
from extproc.routing.gateway import Gateway

CFG = """
backends:
  - name: local
    api: chat
    models: ["llama-*"]
    endpoints: ["127.0.0.1:8001"]
  - name: fleet
    api: chat
    models: ["qwen-*"]
    endpoints:
      - dns: fleet.does-not-resolve.invalid:8000
  - name: openai
    api: both
    models: ["gpt-*"]
    cluster: openai
    api_key_env: UNSERVED_TEST_KEY
"""


def request(gateway: Gateway, model: str):
    ex = Exchange(gateway)
    ex.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}, False)
    step = ex.request_body(json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
    while isinstance(step, Lookup):  # an empty store: nothing learned, no records
        step = step.then([None] * len(step.keys))
    return step


def test_missing_key_and_unresolved_name_are_warnings_with_their_lines():
    cfg = parse_config(CFG, source="c.yaml", env={})
    assert [w.split(": ")[0] for w in cfg.warnings] == ["c.yaml:11", "c.yaml:16", "c.yaml:16"]
    assert "UNSERVED_TEST_KEY is not set" in cfg.warnings[1] and "backend_unconfigured" in cfg.warnings[1]
    assert "no 'clients' section: any caller that reaches the gateway spends this key" in cfg.warnings[2]
    assert "'fleet.does-not-resolve.invalid:8000' does not resolve now" in cfg.warnings[0]
    fleet = cfg.backend("fleet")
    assert fleet is not None and fleet.endpoints == () and fleet.dns_names == ("fleet.does-not-resolve.invalid:8000",)
    assert cfg.unserved() == [
        "Backend 'fleet' has no instances: fleet.does-not-resolve.invalid:8000 resolves to no address yet",
        "Backend 'openai' is not configured: the environment variable UNSERVED_TEST_KEY (its api_key_env) "
        "is not set in the gateway sidecar"]


def test_a_set_key_is_no_warning():
    cfg = parse_config(CFG.replace("dns: fleet.does-not-resolve.invalid", "dns: localhost"), env={"UNSERVED_TEST_KEY": "k"})
    assert [w for w in cfg.warnings if "no 'clients' section" not in w] == [] and cfg.unserved() == []


def test_a_bad_dns_entry_is_still_an_error():
    with pytest.raises(Exception, match="is not 'host:port'"):
        parse_config(CFG.replace("fleet.does-not-resolve.invalid:8000", "no-port.invalid"), env={})


@pytest.mark.parametrize(("model", "code", "names"), [
    ("gpt-5", "backend_unconfigured", "UNSERVED_TEST_KEY"),
    ("qwen-3", "no_endpoints", "fleet.does-not-resolve.invalid:8000"),
])
def test_requests_for_an_unserved_backend_get_503_naming_why(model, code, names):
    gateway = Gateway(parse_config(CFG, env={}))
    with pytest.raises(GatewayError) as e:
        request(gateway, model)
    assert (e.value.status, e.value.code, e.value.type) == (503, code, "server_error")
    assert names in e.value.message


def test_the_other_backends_still_serve():
    act = request(Gateway(parse_config(CFG, env={})), "llama-3")
    assert dict(act.set_headers)["x-gateway-destination-endpoint"] == "127.0.0.1:8001"


def test_check_config_warns_and_exits_0_unless_strict(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UNSERVED_TEST_KEY", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(CFG)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err.count("warning: ") == 3 and "UNSERVED_TEST_KEY" in out.err and "no 'clients' section" in out.err
    assert "OK (3 backends, 0 model rules, 3 warnings)" in out.out
    assert main(["check-config", "--strict", str(path)]) == 1
