"""End to end: the defences of docs/security.md, each through the real Envoy on the repo's deploy/envoy.yaml.

- A hosted provider's certificate is verified (trusted CA and the provider's name) before its key is sent.
- A client cannot steer a backend's key to another host with headers.
- Nothing a client sends forges a line of Envoy's access log or of the sidecar's log.
- With the sidecar down, Envoy says so in the OpenAI error shape.
- Redis with a password and TLS: works with the right ones, a clean 503 `state_unavailable` otherwise.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from extproc.config import parse_config
from extproc.local.stack import Stack, free_port, wait_for_port
from extproc.state.store import StoreUnavailable, open_store

from .conftest import RedisServer
from .pki import CA
from .upstreams import ChatServer, Reply

PROVIDER = "api.openai.com"  # the name deploy/envoy.yaml's openai cluster verifies
PROVIDER_KEY = "sk-provider-secret"
LOCAL_KEY = "sk-local-secret"
REDIS_PASSWORD = "redis-test-password-1"

SIDECAR = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: openai
    api: chat
    models: ["gpt-*"]
    cluster: openai
    api_key_env: PROVIDER_KEY
  - name: local
    api: chat
    models: ["local-*"]
    endpoints: ["{local}"]
    api_key_env: LOCAL_KEY
{state}
"""


def provider_at(port: int, ca: Path) -> Callable[[dict], None]:
    """deploy/envoy.yaml's openai cluster, rewritten only in address, port and CA bundle path."""
    def patch(doc: dict) -> None:
        cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "openai")
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"].update(
            address="127.0.0.1", port_value=port)
        cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"][
            "filename"] = str(ca)
    return patch


@dataclass
class Provider:
    """An HTTPS chat server presenting `cert`, recording the SNI names it was asked for."""

    cert: tuple[Path, Path]
    sni: list[str | None] = field(default_factory=list)
    server: ChatServer = field(init=False)

    def __post_init__(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.cert)
        ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment,misc]
        self.server = ChatServer(tls=ctx)


@dataclass
class Site:
    stack: Stack
    tmp: Path
    extproc: int
    local: ChatServer
    providers: dict[str, Provider]
    urls: dict[str, str]  # provider kind -> Envoy URL whose openai cluster points at it

    def client(self, kind: str = "good") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.urls[kind] + "/v1", api_key="client-key", max_retries=0, timeout=30)


def start_sidecar(stack: Stack, tmp: Path, local: ChatServer, state: str = "", env: dict[str, str] | None = None,
                  name: str = "sidecar") -> int:
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(SIDECAR.format(extproc=port, admin=free_port(), local=local.address, state=state))
    proc = stack.start_sidecar(cfg, {"PROVIDER_KEY": PROVIDER_KEY, "LOCAL_KEY": LOCAL_KEY, **(env or {})}, name)
    wait_for_port(port, proc=proc)
    return port


def start_envoy(stack: Stack, extproc: int, patch: Callable[[dict], None] | None = None) -> str:
    """Envoy's own log goes to a file of its own: its stdout is the access log alone."""
    port = free_port()
    stack.start_envoy(port, free_port(), extproc, patch=patch, args=("--log-path", str(stack.workdir / f"app-{port}.log")))
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = Path(tmp_path_factory.mktemp("security"))
    ca, stranger = CA(tmp, "trusted-ca"), CA(tmp, "untrusted-ca")
    providers = {"good": Provider(ca.issue("good", [PROVIDER])),
                 "wrong_name": Provider(ca.issue("wrong", ["api.attacker.example"])),
                 "untrusted_ca": Provider(stranger.issue("forged", [PROVIDER]))}
    local = ChatServer()
    stack = Stack()
    try:
        extproc = start_sidecar(stack, tmp, local)
        urls = {kind: start_envoy(stack, extproc, provider_at(p.server.port, ca.path)) for kind, p in providers.items()}
        yield Site(stack, tmp, extproc, local, providers, urls)
    finally:
        stack.stop()
        local.close()
        for p in providers.values():
            p.server.close()


def ask(client: openai.OpenAI, model: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)
    return r.choices[0].message.content or ""


def test_provider_certificate_with_the_right_name_is_accepted(site):
    good = site.providers["good"]
    assert ask(site.client(), "gpt-5") == "echo: hi"
    assert good.server.last["headers"]["authorization"] == "Bearer " + PROVIDER_KEY
    assert good.sni[-1] == PROVIDER


@pytest.mark.parametrize("kind", ["wrong_name", "untrusted_ca"])
def test_provider_certificate_not_proving_the_name_is_refused(site, kind):
    """The same cluster, the same CA bundle: a certificate for another name, or for the right name from a
    CA nobody trusts, gets the TLS handshake refused, so the key is never sent."""
    impostor = site.providers[kind]
    with pytest.raises(openai.APIStatusError) as e:
        ask(site.client(kind), "gpt-5")
    assert e.value.status_code == 503
    assert "CERTIFICATE_VERIFY_FAILED" in e.value.body["code"], e.value.body  # Envoy's response details
    assert impostor.sni and impostor.sni[-1] == PROVIDER  # it was dialled, and refused during the handshake
    assert impostor.server.requests == []


def test_client_headers_cannot_steer_a_backend_key_elsewhere(site):
    """Every header a client could use to pick the host: the key still goes to the backend's own host only."""
    trap = ChatServer()
    try:
        steer = {"x-gateway-destination-endpoint": trap.address, "x-gateway-cluster": "openai",
                 "x-gateway-backend": "local", "x-envoy-original-dst-host": trap.address, "host": trap.address,
                 "x-forwarded-host": trap.address, "authorization": "Bearer client-key"}
        assert ask(site.client(), "gpt-5", extra_headers=steer) == "echo: hi"  # a cluster backend
        assert site.providers["good"].server.last["headers"]["authorization"] == "Bearer " + PROVIDER_KEY
        assert ask(site.client(), "local-1", extra_headers={**steer, "x-gateway-cluster": "local"}) == "echo: hi"
        assert site.local.last["headers"]["authorization"] == "Bearer " + LOCAL_KEY  # an endpoint backend
        assert trap.requests == [] and not trap.conns
    finally:
        trap.close()


def test_client_envoy_control_headers_are_ignored(site):
    """Clients are external to Envoy: their x-envoy-* retry and timeout headers are dropped, so they cannot
    multiply upstream calls (each carrying the backend's key) or change the route's timeout."""
    site.local.reset()
    site.local.script.extend([Reply(error=(503, {"error": {"message": "busy", "type": "server_error"}}))] * 3)
    headers = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "2", "x-envoy-upstream-rq-timeout-ms": "1"}
    with pytest.raises(openai.APIStatusError) as e:
        ask(site.client(), "local-1", extra_headers=headers)
    assert e.value.status_code == 503 and e.value.body["message"] == "busy"  # the upstream's answer, not a timeout
    assert len(site.local.requests) == 1
    site.local.reset()


# Line separators but no control characters: a name the gateway routes (one with \n or \r is refused).
FORGED = ('gpt-forge\u2028{"start_time":"2026-01-01T00:00:00.000Z","method":"POST","path":"/v1/admin","status":200,'
          '"model":"gpt-5","backend":"openai"}\u2029[2026-01-01T00:00:00.000Z] "POST /v1/chat/completions" 200\u2028x')


def wait_for_lines(read: Callable[[], str], needle: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while needle not in read():
        assert time.monotonic() < deadline, f"{needle!r} never logged"
        time.sleep(0.1)
    return read().split("\n")[:-1]  # NDJSON: records end with \n (and only there)


def test_model_name_with_newlines_cannot_forge_log_lines(site):
    refused = FORGED.replace("\u2028", "\n").replace("\u2029", "\r\n")
    with pytest.raises(openai.BadRequestError) as e:  # a newline is a control character: no model has one
        ask(site.client(), refused)
    assert e.value.body["param"] == "model"
    assert ask(site.client(), FORGED) == "echo: hi"  # routed like any gpt-* model
    port = site.urls["good"].rsplit(":", 1)[1]
    lines = wait_for_lines(lambda: site.stack.log(f"envoy-{port}"), "gpt-forge\u2028")  # Envoy writes it as UTF-8
    records = [json.loads(line) for line in lines]  # every line of the access log is one JSON object
    assert all(isinstance(r, dict) for r in records)
    assert [r["model"] for r in records if "gpt-forge" in str(r["model"])] == [refused, FORGED]  # as Envoy read it
    assert not [r for r in records if r["path"] == "/v1/admin" or r["start_time"].startswith("2026-01-01")]
    sidecar = [line for line in wait_for_lines(lambda: site.stack.log("sidecar"), "gpt-forge") if "gpt-forge" in line]
    assert len(sidecar) == 1 and json.loads(sidecar[0])["model"] == FORGED


def raw_post(url: str, body: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_sidecar_down_is_named_in_the_openai_error_shape(site):
    stack = Stack(workdir=site.tmp / "down")
    stack.workdir.mkdir()
    try:
        extproc = start_sidecar(stack, site.tmp, site.local, name="down-sidecar")
        url = start_envoy(stack, extproc)
        body = b'{"model": "local-1", "messages": [{"role": "user", "content": "hi"}]}'
        assert raw_post(url, body)[0] == 200
        sidecar = stack.procs[0]
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(timeout=10)
        before = len(site.local.requests)
        assert raw_post(url, body) == (503, {"error": {"message": "the gateway sidecar is unavailable",
                                                       "type": "gateway_error", "param": None,
                                                       "code": "sidecar_unavailable"}})
        assert len(site.local.requests) == before  # fail closed: nothing went upstream unrouted
    finally:
        stack.stop()


# -- Redis with a password and TLS ---------------------------------------------------------------------


@dataclass
class Redis:
    ca: CA
    server: RedisServer
    wrong_name: RedisServer  # trusted CA, certificate for another host


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    tmp = Path(tmp_path_factory.mktemp("redis-tls"))
    ca = CA(tmp, "redis-ca")

    def server(name: str, names: list[str]) -> RedisServer:
        crt, key = ca.issue(name, names)
        (tmp / name).mkdir()
        return RedisServer(tmp / name, tls=True, args=(
            "--requirepass", REDIS_PASSWORD, "--tls-cert-file", str(crt), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca.path), "--tls-auth-clients", "no"))  # the password authenticates clients

    good = server("good", ["localhost", "127.0.0.1"])
    wrong = server("wrong", ["redis.elsewhere.example"])
    try:
        yield Redis(ca, good, wrong)
    finally:
        good.stop()
        wrong.stop()


def redis_state(url: str, ca: Path | None, password_env: str | None = "GW_REDIS_PASSWORD") -> str:
    lines = ["state:", "  store: redis", f"  redis_url: {url}"]
    if password_env:
        lines.append(f"  redis_password_env: {password_env}")
    if ca is not None:
        lines.append(f"  redis_ca_file: {ca}")
    return "\n".join(lines)


def store_roundtrip(state_yaml: str, password: str) -> list[bytes | None]:
    """Through the config a sidecar loads: write, read back and scan one record."""
    cfg = parse_config(f"backends: [{{name: b, api: chat, models: [m], endpoints: ['127.0.0.1:1']}}]\n{state_yaml}",
                       env={"GW_REDIS_PASSWORD": password})
    assert password not in repr(cfg.state)

    async def go() -> list[bytes | None]:
        store = open_store(cfg.state)
        try:
            await store.write([("security-test", b"held")])
            found = await store.get_many(("security-test",))
            assert ("security-test", b"held") in await store.scan("security-")
            return found
        finally:
            await store.close()
    return asyncio.run(go())


def test_redis_with_password_over_verified_tls_works(redis_tls):
    assert store_roundtrip(redis_state(redis_tls.server.url, redis_tls.ca.path), REDIS_PASSWORD) == [b"held"]


@pytest.mark.parametrize("case", ["wrong_password", "no_password", "untrusted_ca", "wrong_name"])
def test_redis_refusing_us_is_store_unavailable(redis_tls, case):
    url, ca, password, env = redis_tls.server.url, redis_tls.ca.path, REDIS_PASSWORD, "GW_REDIS_PASSWORD"
    if case == "wrong_password":
        password = "not-the-password"
    elif case == "no_password":
        env = None
    elif case == "untrusted_ca":
        ca = None  # the system store only: the test CA is not in it
    else:
        url = redis_tls.wrong_name.url
    with pytest.raises(StoreUnavailable):
        store_roundtrip(redis_state(url, ca, env), password)


def test_redis_password_and_tls_through_envoy(site, redis_tls):
    """The sidecar keeps a chat backend's conversation in Redis over TLS with the password; a sidecar with
    the wrong password answers first turns and gives a clean 503 state_unavailable for continuations."""
    state = redis_state(redis_tls.server.url, redis_tls.ca.path)
    tenant = {"EXTPROC_TENANT_SECRET": "t" * 32}  # else a sidecar waits at start to read it from the store
    right = start_sidecar(site.stack, site.tmp, site.local, state, {**tenant, "GW_REDIS_PASSWORD": REDIS_PASSWORD},
                          "redis-right")
    wrong = start_sidecar(site.stack, site.tmp, site.local, state, {**tenant, "GW_REDIS_PASSWORD": "nope"}, "redis-wrong")
    good = openai.OpenAI(base_url=start_envoy(site.stack, right) + "/v1", api_key="k", max_retries=0, timeout=30)
    bad = openai.OpenAI(base_url=start_envoy(site.stack, wrong) + "/v1", api_key="k", max_retries=0, timeout=30)
    first = good.responses.create(model="local-1", input="remember seven")
    second = good.responses.create(model="local-1", input="what was it?", previous_response_id=first.id)
    assert second.output_text == "echo: what was it?"
    assert [m["content"] for m in site.local.last["body"]["messages"]][:1] == ["remember seven"]  # held in Redis
    assert bad.responses.create(model="local-1", input="a first turn").output_text == "echo: a first turn"
    with pytest.raises(openai.APIStatusError) as e:
        bad.responses.create(model="local-1", input="x", previous_response_id=first.id)
    assert e.value.status_code == 503 and e.value.body["code"] == "state_unavailable"
    assert bad.responses.create(model="local-1", input="still up").output_text == "echo: still up"
