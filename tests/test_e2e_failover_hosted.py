"""Failover between a self-hosted pool and a hosted provider (`url:`) through the real Envoy (issue 27).

A group of a local chat pool and a hosted Responses provider (a TLS server with a certificate from a
test CA, answering only with its own key and under its path prefix, tests/upstreams.py `HostedServer`),
both ways round: the failing member's request is failed over to the other, every client API, streamed
and not. The provider gets its key, its Host, its SNI and its path; the pool never sees the provider's
key, nor the provider's Host; the client never sees the key; an Azure member gets its deployment path
and `api-key`."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port

from .pki import CA
from .test_e2e_hosted import tls
from .upstreams import AzureServer, ChatServer, HostedServer, Reply

HOSTED_KEY, AZURE_KEY, API_VERSION = "sk-hosted-provider-key-1", "abcdef0123456789abcdef0123456789", "2024-10-21"
CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
failover: {{max_attempts: 3, eject_after: 50}}
backends:
  - name: local-pool
    api: chat
    models: ["pooled", "pooled-azure"]
    endpoints: ["{chat}"]
  - name: hosted
    api: responses
    models: ["pooled", "hosted-first"]
    url: https://api.hosted.localhost:{hosted}/api
    ca_file: {ca}
    api_key_env: HOSTED_KEY
    headers: {{X-Title: gateway}}
  - name: azure
    api: chat
    models: ["pooled-azure"]
    url: https://contoso.openai.azure.localhost:{azure}
    provider: azure
    api_version: "{api_version}"
    deployments: {{pooled-azure: prod-4o}}
    ca_file: {ca}
    api_key_env: AZURE_KEY
  - name: local-after
    api: chat
    models: ["hosted-first"]
    endpoints: ["{chat}"]
"""


@dataclass
class Site:
    url: str
    envoy_admin: str
    chat: ChatServer
    hosted: HostedServer
    azure: AzureServer
    sni: list[str | None]
    stack: Stack

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = Path(tmp_path_factory.mktemp("failover-hosted"))
    ca = CA(tmp, "provider-ca")
    sni: list[str | None] = []
    chat = ChatServer()
    hosted = HostedServer(tls(ca.issue("hosted", ["api.hosted.localhost"]), sni), ("authorization", "Bearer " + HOSTED_KEY),
                          prefix="/api")
    azure = AzureServer(tls(ca.issue("azure", ["contoso.openai.azure.localhost"]), []), AZURE_KEY, API_VERSION, {"prod-4o"})
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(extproc=extproc, admin=admin, chat=chat.address, hosted=hosted.port, azure=azure.port,
                                 ca=ca.path, api_version=API_VERSION))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg, env={"HOSTED_KEY": HOSTED_KEY, "AZURE_KEY": AZURE_KEY,
                                                "EXTPROC_LOG_LEVEL": "debug"})
        wait_for_port(extproc, proc=sidecar)
        stack.start_envoy(port, envoy_admin, extproc)
        yield Site(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{envoy_admin}", chat, hosted, azure, sni, stack)
    finally:
        stack.stop()
        chat.close()
        hosted.close()
        azure.close()


@pytest.fixture
def s(site: Site) -> Site:
    for server in (site.chat, site.hosted, site.azure):
        server.reset()
    return site


def _down(status: int = 503) -> Reply:
    return Reply(error=(status, {"error": {"message": "overloaded", "type": "server_error", "param": None,
                                           "code": None}}))


def _ask(client: openai.OpenAI, api: str, stream: bool, model: str) -> tuple[str, dict[str, str]]:
    """One request in the client API `api`: the answer's text and its headers."""
    if api == "chat":
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            with client.chat.completions.with_streaming_response.create(model=model, messages=msgs, stream=True) as r:
                text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
                return text, dict(r.headers)
        raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs)
        return raw.parse().choices[0].message.content or "", dict(raw.headers)
    if stream:
        with client.responses.with_streaming_response.create(model=model, input="hi", stream=True) as r:
            text = "".join(e.delta for e in r.parse() if e.type == "response.output_text.delta")
            return text, dict(r.headers)
    raw = client.responses.with_raw_response.create(model=model, input="hi")
    return raw.parse().output_text, dict(raw.headers)


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


APIS = [("chat", False), ("chat", True), ("responses", False), ("responses", True)]


@pytest.mark.parametrize(("api", "stream"), APIS)
def test_a_failing_pool_fails_over_to_the_hosted_member_with_its_key_and_host(s, api, stream):
    s.chat.script.append(_down())
    s.hosted.script.append(Reply(text="served by the provider"))
    text, answer_headers = _ask(s.client(), api, stream, "pooled")
    assert text == "served by the provider"
    assert [r["path"] for r in s.chat.requests] == ["/v1/chat/completions"]  # tried once, on its own API
    pool = _lower(s.chat.requests[0]["headers"])
    assert pool["authorization"] == "Bearer client-key"  # the client's own: the pool has no key
    assert pool["host"] == s.url.removeprefix("http://") and "x-title" not in pool
    # the provider: its path prefix, the Responses API (a chat client's request translated), its own key
    # in place of the client's, its Host and extras, over TLS to its own name
    assert [r["path"] for r in s.hosted.seen] == ["/api/v1/responses"]
    seen = _lower(s.hosted.seen[0]["headers"])
    assert seen["authorization"] == "Bearer " + HOSTED_KEY
    assert seen["host"] == f"api.hosted.localhost:{s.hosted.port}" and seen["x-title"] == "gateway"
    assert s.sni[-1] == "api.hosted.localhost"
    assert HOSTED_KEY not in json.dumps(answer_headers)


@pytest.mark.parametrize(("api", "stream"), APIS)
def test_a_failing_hosted_primary_fails_over_to_the_pool_which_never_sees_its_key(s, api, stream):
    s.hosted.script.append(_down())
    s.chat.script.append(Reply(text="served by the pool"))
    text, _ = _ask(s.client(), api, stream, "hosted-first")
    assert text == "served by the pool"
    assert [r["path"] for r in s.hosted.seen] == ["/api/v1/responses"]
    assert _lower(s.hosted.seen[0]["headers"])["authorization"] == "Bearer " + HOSTED_KEY
    assert [r["path"] for r in s.chat.requests] == ["/v1/chat/completions"]
    pool = _lower(s.chat.requests[0]["headers"])
    # the attempt before put the provider's key, Host and extras on the one header map: all set back
    assert pool["authorization"] == "Bearer client-key" and HOSTED_KEY not in json.dumps(pool)
    assert pool["host"] == s.url.removeprefix("http://") and "x-title" not in pool


@pytest.mark.parametrize("stream", [False, True])
def test_an_azure_member_gets_its_deployment_path_version_and_api_key(s, stream):
    s.chat.script.append(_down(502))
    s.azure.script.append(Reply(text="served by azure"))
    text, _ = _ask(s.client(), "chat", stream, "pooled-azure")
    assert text == "served by azure"
    assert [r["path"] for r in s.azure.seen] == [
        f"/openai/deployments/prod-4o/chat/completions?api-version={API_VERSION}"]
    seen = _lower(s.azure.seen[0]["headers"])
    assert seen["api-key"] == AZURE_KEY and "authorization" not in seen  # the client's key removed
    assert seen["host"] == f"contoso.openai.azure.localhost:{s.azure.port}"


def test_every_member_failing_is_one_error_naming_both(s):
    s.chat.script.append(_down())
    s.hosted.script.append(_down(500))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(s.client(), "chat", False, "pooled")
    message = e.value.response.json()["error"]["message"]
    assert "local-pool: 503" in message and "hosted: 500" in message
    assert HOSTED_KEY not in e.value.response.text


def test_the_provider_key_is_in_no_log_and_no_envoy_config(s):
    s.chat.script.append(_down())
    s.hosted.script.append(Reply(text="served"))
    assert _ask(s.client(), "responses", False, "pooled")[0] == "served"
    assert HOSTED_KEY not in s.stack.log("sidecar")
    with urllib.request.urlopen(s.envoy_admin + "/config_dump?include_eds", timeout=5) as r:
        dump = r.read().decode()
    assert "group.local-pool.hosted" in dump and HOSTED_KEY not in dump and AZURE_KEY not in dump
