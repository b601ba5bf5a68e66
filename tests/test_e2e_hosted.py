"""End to end: hosted providers declared by `url:`, through the real Envoy on the repo's deploy/envoy.yaml.

The providers are local TLS servers shaped like the real ones (tests/upstreams.py `HostedServer`): an
OpenAI-like one for `api.openai.localhost` (a name that resolves to loopback, RFC 6761) with a
certificate from a test CA given as `ca_file`, an OpenRouter-like one that answers only under `/api`,
and one whose certificate comes from a CA the backend does not trust. The sidecar compiles their
clusters and hands Envoy their keys as SDS secrets: keyed requests take the fast path (the processor
never sees them), the key is in no `/config_dump`, and a rotated key file reaches Envoy without a restart.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port, wait_until

from .pki import CA
from .upstreams import AzureServer, HostedServer, Reply

OPENAI_KEY, ROUTER_KEY = "sk-openai-test-key-1", "sk-or-test-key"
CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: openai
    api: chat
    models: ["gpt-*"]
    url: https://api.openai.localhost:{openai}
    ca_file: {ca}
    api_key_file: {key_file}
  - name: openrouter
    api: chat
    models: ["router/*"]
    url: https://openrouter.localhost:{router}/api
    ca_file: {ca}
    api_key_env: ROUTER_KEY
    headers: {{HTTP-Referer: "https://gateway.example", X-Title: gateway}}
  - name: forged
    api: chat
    models: ["forged-*"]
    url: https://api.forged.localhost:{forged}
    ca_file: {ca}
    api_key_env: ROUTER_KEY
  - name: h2
    api: chat
    models: ["h2-*"]
    url: https://h2.provider.localhost:{h2}
    ca_file: {ca}
  - name: hosted-auto
    api: auto
    models: ["hc-*"]
    url: https://api.mixed.localhost:{mixed}
    ca_file: {ca}
    api_key_env: ROUTER_KEY
  - name: azure
    api: chat
    models: ["az-*"]
    url: https://contoso.openai.azure.localhost:{azure}
    provider: azure
    api_version: "{api_version}"
    deployments: {{az-4o: prod-4o}}
    ca_file: {ca}
    api_key_env: AZURE_KEY
  - name: azure-responses
    api: responses
    models: ["azr-*"]
    url: https://contoso.openai.azure.localhost:{azure}
    provider: azure
    api_version: "{api_version}"
    deployments: {{azr-4o: prod-4o}}
    ca_file: {ca}
    api_key_env: AZURE_KEY
  - name: azure-v1
    api: both
    models: ["prod-4o", "az1-*"]
    url: https://contoso.openai.azure.localhost:{azure}
    provider: azure
    ca_file: {ca}
    api_key_env: AZURE_KEY
"""
AZURE_KEY, API_VERSION = "0123456789abcdef0123456789abcdef", "2024-10-21"
CONTENT_FILTERED = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
               "Please modify your prompt and retry.", "type": None, "param": "prompt", "code": "content_filter",
    "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "medium"}}}}}


def tls(cert: tuple[Path, Path], sni: list[str | None]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,misc]
    return ctx


class PrefaceRecorder:
    """A TLS server offering HTTP/2 by ALPN that records what each client chose and its first bytes."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.sock = ctx.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str | None, bytes]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except ssl.SSLError:
                continue  # a client that gave up on the handshake
            except OSError:
                return  # closed
            with conn, contextlib.suppress(OSError):
                conn.settimeout(10)
                self.seen.append((conn.selected_alpn_protocol(), conn.recv(24)))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Site:
    url: str
    envoy_admin: str
    config: Path
    key_file: Path
    stack: Stack
    servers: dict[str, HostedServer]
    sni: dict[str, list[str | None]]
    h2: PrefaceRecorder

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-own-key", max_retries=0, timeout=30)

    def envoy(self, path: str) -> str:
        with urllib.request.urlopen(self.envoy_admin + path, timeout=5) as r:
            return r.read().decode()

    def stat(self, name: str) -> int:
        stats = json.loads(self.envoy(f"/stats?filter=^{name}$&format=json"))["stats"]
        return int(stats[0]["value"]) if stats else 0

    def processed(self) -> int:
        """ext_proc streams Envoy opened on the client side: one per request that reached the processor."""
        return self.stat("http.llm.ext_proc.streams_started")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = Path(tmp_path_factory.mktemp("hosted"))
    ca, stranger = CA(tmp, "provider-ca"), CA(tmp, "stranger-ca")
    sni: dict[str, list[str | None]] = {"openai": [], "router": [], "forged": [], "azure": [], "mixed": []}
    servers = {
        "openai": HostedServer(tls(ca.issue("openai", ["api.openai.localhost"]), sni["openai"]),
                               ("authorization", "Bearer " + OPENAI_KEY)),
        "router": HostedServer(tls(ca.issue("router", ["openrouter.localhost"]), sni["router"]),
                               ("authorization", "Bearer " + ROUTER_KEY), prefix="/api"),
        "forged": HostedServer(tls(stranger.issue("forged", ["api.forged.localhost"]), sni["forged"]),
                               ("authorization", "Bearer " + ROUTER_KEY)),
        "mixed": HostedServer(tls(ca.issue("mixed", ["api.mixed.localhost"]), sni["mixed"]),
                              ("authorization", "Bearer " + ROUTER_KEY), responses_only={"hc-resp-1", "hc-resp-2"},
                              chat_only={"hc-chat-1", "hc-chat-2"}),
        "azure": AzureServer(tls(ca.issue("azure", ["contoso.openai.azure.localhost"]), sni["azure"]), AZURE_KEY,
                             API_VERSION, {"prod-4o", "az-mini", "az1-small"}),
    }
    h2 = PrefaceRecorder(tls(ca.issue("h2", ["h2.provider.localhost"]), []))
    key_file = tmp / "openai.key"
    key_file.write_text(OPENAI_KEY + "\n")  # as a mounted Secret may hold it
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(extproc=extproc, admin=admin, ca=ca.path, key_file=key_file, api_version=API_VERSION,
                                 h2=h2.port, **{k: s.port for k, s in servers.items()}))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg, env={"ROUTER_KEY": ROUTER_KEY, "AZURE_KEY": AZURE_KEY})
        wait_for_port(extproc, proc=sidecar)
        stack.start_envoy(port, envoy_admin, extproc)
        yield Site(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{envoy_admin}", cfg, key_file, stack, servers, sni,
                   h2)
    finally:
        stack.stop()
        h2.close()
        for s in servers.values():
            s.close()


@pytest.fixture
def hosted(site: Site) -> Site:
    for s in site.servers.values():
        s.reset()
    return site


def chat(client: openai.OpenAI, model: str, text: str = "hi") -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content or ""


def test_a_keyed_request_takes_the_fast_path_and_the_provider_sees_envoys_key(hosted):
    before = hosted.processed()
    assert chat(hosted.client(), "gpt-5") == "echo: hi"
    chunks = list(hosted.client().chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "yo"}], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: yo"
    assert hosted.processed() == before  # neither reached the processor
    openai_ = hosted.servers["openai"]
    assert [r["headers"]["authorization"] for r in openai_.seen] == ["Bearer " + OPENAI_KEY] * 2  # not the client's
    assert openai_.seen[0]["headers"]["host"] == f"api.openai.localhost:{openai_.port}"
    assert hosted.sni["openai"][-1] == "api.openai.localhost"


def test_the_processor_path_reaches_the_provider_with_the_key_too(hosted):
    before = hosted.processed()
    assert hosted.client().responses.create(model="gpt-5", input="hi").output_text == "echo: hi"  # translated
    assert hosted.processed() == before + 1
    assert hosted.servers["openai"].seen[-1]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert hosted.servers["openai"].seen[-1]["path"] == "/v1/chat/completions"


def test_a_path_prefix_and_provider_extras_reach_an_openrouter_like_provider(hosted):
    router = hosted.servers["router"]
    assert chat(hosted.client(), "router/llama-3") == "echo: hi"  # the fast path
    assert hosted.client().responses.create(model="router/llama-3", input="yo").output_text == "echo: yo"
    assert [r["path"] for r in router.seen] == ["/api/v1/chat/completions"] * 2
    for r in router.seen:
        assert r["headers"]["http-referer"] == "https://gateway.example" and r["headers"]["x-title"] == "gateway"
        assert r["headers"]["authorization"] == "Bearer " + ROUTER_KEY


def test_a_provider_whose_certificate_the_ca_file_does_not_vouch_for_never_gets_the_request(hosted):
    for call in (lambda: chat(hosted.client(), "forged-1"),
                 lambda: hosted.client().responses.create(model="forged-1", input="hi")):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == 503 and isinstance(e.value.body, dict)
        assert e.value.body["type"] == "gateway_error"  # Envoy's own error, in the OpenAI shape
    assert hosted.servers["forged"].seen == []  # no HTTP request: the handshake failed first
    assert hosted.sni["forged"]  # it was asked, by name


def test_a_provider_offering_http2_is_spoken_to_in_http2_and_others_in_http11(hosted):
    with pytest.raises(openai.APIStatusError):
        chat(hosted.client(), "h2-model")  # the recorder answers nothing: only what Envoy chose matters here
    assert hosted.h2.seen and hosted.h2.seen[0] == ("h2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the h2 preface
    assert chat(hosted.client(), "gpt-5") == "echo: hi"  # a provider offering no ALPN (HTTP/1.1 only) still answers


def test_config_dump_shows_the_keys_redacted(hosted):
    chat(hosted.client(), "gpt-5")
    dump = hosted.envoy("/config_dump?include_eds")
    assert OPENAI_KEY not in dump and ROUTER_KEY not in dump
    secrets = next(c for c in json.loads(dump)["configs"] if c["@type"].endswith("SecretsConfigDump"))
    active = {s["name"]: s["secret"]["generic_secret"]["secret"] for s in secrets["dynamic_active_secrets"]}
    assert active == {f"key.{name}": {"inline_string": "[redacted]"}
                      for name in ("openai", "openrouter", "forged", "hosted-auto", "azure", "azure-responses",
                                   "azure-v1")}
    assert AZURE_KEY not in dump


def test_a_rotated_key_file_reaches_envoy_and_the_processor_without_a_restart(hosted):
    envoy = next(p for p in hosted.stack.procs if "envoy" in str(p.args[0]))
    rotated = "sk-openai-test-key-2"
    openai_ = hosted.servers["openai"]
    try:
        openai_.expect = ("authorization", "Bearer " + rotated)  # the provider now takes only the new key
        hosted.key_file.write_text(rotated + "\n")
        assert wait_until(lambda: _ok(hosted), timeout=20, interval=0.3), "the rotated key did not reach Envoy"
        assert hosted.client().responses.create(model="gpt-5", input="hi").output_text == "echo: hi"  # processor
        assert envoy.poll() is None and rotated not in hosted.envoy("/config_dump")
    finally:
        openai_.expect = ("authorization", "Bearer " + OPENAI_KEY)
        hosted.key_file.write_text(OPENAI_KEY + "\n")
        assert wait_until(lambda: _ok(hosted), timeout=20, interval=0.3)


def _ok(site: Site) -> bool:
    try:
        return chat(site.client(), "gpt-5") == "echo: hi"
    except openai.AuthenticationError:
        return False


def test_check_config_and_resolve_show_the_compiled_target(site):
    out = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(site.config)], capture_output=True,
                         text=True, env={"ROUTER_KEY": ROUTER_KEY, "PATH": "/usr/bin:/bin"}, check=True).stdout
    port = site.servers["router"].port
    assert (f"openrouter: cluster llm.openrouter: https://openrouter.localhost:{port}/api (provider openai), TLS to "
            "openrouter.localhost (SNI and certificate name checked against ca_file ") in out
    out = subprocess.run([sys.executable, "-m", "extproc", "resolve", "--config", str(site.config), "gpt-5"],
                         capture_output=True, text=True, check=True).stdout
    assert "target:   cluster llm.openai: https://api.openai.localhost:" in out
    assert "key in Envoy's secret key.openai as authorization" in out
    assert "chat client -> chat upstream; fast path: Envoy routes it to cluster llm.openai" in out


def test_azure_classic_paths_name_the_deployment_and_the_api_version(hosted):
    azure = hosted.servers["azure"]
    assert chat(hosted.client(), "az-4o") == "echo: hi"  # deployments maps it
    assert chat(hosted.client(), "az-mini") == "echo: hi"  # its own deployment name
    assert hosted.client().responses.create(model="az-4o", input="yo").output_text == "echo: yo"  # translated
    query = f"?api-version={API_VERSION}"
    assert [r["path"] for r in azure.seen] == [f"/openai/deployments/prod-4o/chat/completions{query}",
                                               f"/openai/deployments/az-mini/chat/completions{query}",
                                               f"/openai/deployments/prod-4o/chat/completions{query}"]
    assert all(r["headers"]["api-key"] == AZURE_KEY and "authorization" not in r["headers"] for r in azure.seen)


def test_azure_classic_responses_name_the_deployment_in_the_body(hosted):
    azure = hosted.servers["azure"]
    assert hosted.client().responses.create(model="azr-4o", input="hi", store=False).output_text == "echo: hi"
    assert azure.seen[-1]["path"] == f"/openai/responses?api-version={API_VERSION}"
    assert azure.requests[-1]["body"]["model"] == "prod-4o"  # Azure knows it by its deployment


def test_azure_v1_paths_take_the_fast_path_responses_included(hosted):
    """Once each model's API is learned from its first answer (the backend says `both`), Envoy alone."""
    azure = hosted.servers["azure"]

    def envoy_alone() -> bool:
        before = hosted.processed()
        assert chat(hosted.client(), "prod-4o") == "echo: hi"
        assert hosted.client().responses.create(model="az1-small", input="yo", store=False).output_text == "echo: yo"
        return hosted.processed() == before
    assert wait_until(envoy_alone, timeout=20, interval=0.2)
    assert {r["path"] for r in azure.seen} == {"/openai/v1/chat/completions", "/openai/v1/responses"}
    assert all(r["headers"]["api-key"] == AZURE_KEY for r in azure.seen)


def test_an_azure_deployment_it_does_not_have_is_its_404(hosted):
    with pytest.raises(openai.NotFoundError) as e:
        chat(hosted.client(), "az-unknown")
    assert e.value.status_code == 404


def test_azure_content_filter_errors_reach_each_client_in_its_own_shape(hosted):
    """Passed through, Azure's error is already the chat API's shape and goes untouched; translated for a
    Responses client it becomes that API's error, code, param and message kept."""
    azure = hosted.servers["azure"]
    azure.script.append(Reply(error=(400, CONTENT_FILTERED)))
    with pytest.raises(openai.BadRequestError) as e:
        chat(hosted.client(), "az-4o")
    assert e.value.body == CONTENT_FILTERED["error"]
    azure.script.append(Reply(error=(400, CONTENT_FILTERED)))
    with pytest.raises(openai.BadRequestError) as e:
        hosted.client().responses.create(model="az-4o", input="hi")
    body = e.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("content_filter", "prompt")
    assert body["message"] == CONTENT_FILTERED["error"]["message"] and isinstance(body["type"], str)


def test_an_azure_stream_with_filter_annotations_reaches_a_responses_client_whole(hosted):
    azure = hosted.servers["azure"]
    results = {"hate": {"filtered": False, "severity": "safe"}}
    base = {"id": "chatcmpl-az1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06"}
    events = [json.dumps({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                          "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": results}]}),
              json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None, "content_filter_results": {}}]}),
              json.dumps({**base, "choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": None,
                                               "content_filter_results": results}]}),
              json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter",
                                               "content_filter_results": results}]}),
              "[DONE]"]
    azure.script.append(Reply(events=[e.encode() for e in events]))
    with hosted.client().responses.stream(model="az-4o", input="hi") as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete", kinds
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "fine"
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "content_filter"


@pytest.mark.parametrize("stream", [False, True])
def test_first_contact_on_a_hosted_auto_backend_succeeds_in_both_directions(hosted, stream):
    """A model the provider serves on the other API only: the rejection is retried, translated, inside
    Envoy (no byte of it reaches the client), the key on both attempts; the next request goes straight."""
    client, n = hosted.client(), 2 if stream else 1
    retries = hosted.stat("cluster.first-contact.llm.hosted-auto.upstream_rq_retry")
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = client.chat.completions.create(model=f"hc-resp-{n}", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"
        with client.responses.stream(model=f"hc-chat-{n}", input="hi") as s:
            assert s.get_final_response().output_text == "echo: hi"
    else:
        assert chat(client, f"hc-resp-{n}") == "echo: hi"
        assert client.responses.create(model=f"hc-chat-{n}", input="hi").output_text == "echo: hi"
    mixed = hosted.servers["mixed"]
    assert [(r["path"], r["headers"]["authorization"]) for r in mixed.seen] == [
        (p, "Bearer " + ROUTER_KEY) for p in ("/v1/chat/completions", "/v1/responses", "/v1/responses",
                                              "/v1/chat/completions")]
    assert hosted.stat("cluster.first-contact.llm.hosted-auto.upstream_rq_retry") == retries + 2  # Envoy retried
    assert not [h for r in mixed.seen for h in r["headers"] if h.lower().startswith("x-gateway-")]  # either attempt
    assert chat(client, f"hc-resp-{n}") == "echo: hi"  # learned: straight to the Responses API
    assert mixed.seen[-1]["path"] == "/v1/responses" and len(mixed.seen) == 5
