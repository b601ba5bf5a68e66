"""End to end: the ext_proc listener on a unix socket, and behind mutual TLS, with the real Envoy."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from extproc.local.stack import (
    Stack,
    find_envoy,
    free_port,
    render_envoy_config,
    wait_for_envoy,
    wait_for_port,
)

from .pki import CA
from .upstreams import ChatServer, Reply

SIDECAR = """
listen: {listen}
admin_listen: 127.0.0.1:{admin}
{tls}
backends:
  - name: local
    api: chat
    models: ["m"]
    endpoints: ["{chat}"]
"""


@pytest.fixture
def chat():
    server = ChatServer()
    yield server
    server.close()


def envoy_for(stack: Stack, extproc_cluster_patch, ready: bool = True, admin: int | None = None):
    """Envoy with its extproc cluster patched: its URL once ready, or (ready=False) its URL and admin
    port once it has tried the sidecar twice and been refused (so it has no routes)."""
    port, admin = free_port(), admin or free_port()
    doc = yaml.safe_load(render_envoy_config(port, admin, 1))
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            extproc_cluster_patch(cluster)
    cfg = stack.workdir / f"envoy-{port}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    stack.spawn(f"envoy-{port}", [find_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id", str(port),
                                  "--disable-hot-restart"])
    if ready:
        wait_for_envoy(admin)
        return f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 20
    while _stat(admin, "cluster.extproc.upstream_cx_total") < 2:
        assert time.monotonic() < deadline, "Envoy never tried the sidecar"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", admin


def _stat(admin: int, name: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^{name}$", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0  # admin not up yet
    return int(text.split(":")[1]) if ":" in text else 0


def ask(url: str) -> str:
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=20)
    return client.responses.create(model="m", input="over the socket").output_text


def test_unix_socket(chat, tmp_path):
    sock = tmp_path / "extproc.sock"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SIDECAR.format(listen=f"unix:{sock}", admin=free_port(), tls="", chat=chat.address))
    stack = Stack()
    try:
        proc = stack.start_sidecar(cfg)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, stack.log("sidecar")
            time.sleep(0.05)

        def patch(cluster: dict) -> None:
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {"pipe": {"path": str(sock)}}
        assert ask(envoy_for(stack, patch)) == "echo: over the socket"
    finally:
        stack.stop()


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate for Envoy."""
    ca = CA(d, "ca")
    ca.issue("server", ["localhost", "127.0.0.1"])
    ca.issue("client", ["envoy"], client=True)


def test_mutual_tls(chat, tmp_path):
    make_pki(tmp_path)
    port = free_port()
    tls = (f"listen_tls: {{cert_file: {tmp_path / 'server.crt'}, key_file: {tmp_path / 'server.key'}, "
           f"client_ca_file: {tmp_path / 'ca.crt'}}}")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SIDECAR.format(listen=f"127.0.0.1:{port}", admin=free_port(), tls=tls, chat=chat.address))
    stack = Stack()
    try:
        wait_for_port(port, proc=stack.start_sidecar(cfg))

        def with_client_cert(cluster: dict) -> None:
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = port
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{"certificate_chain": {"filename": str(tmp_path / "client.crt")},
                                          "private_key": {"filename": str(tmp_path / "client.key")}}],
                    "validation_context": {"trusted_ca": {"filename": str(tmp_path / "ca.crt")}}}}}

        assert ask(envoy_for(stack, with_client_cert)) == "echo: over the socket"

        def plain(cluster: dict) -> None:  # no TLS at all: refused, so Envoy never gets its routes
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = port
        url, admin = envoy_for(stack, plain, ready=False)
        with pytest.raises(openai.APIConnectionError):  # fails closed: the listener never opens
            ask(url)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5)
        assert not chat.requests[1:]

        def without_client_cert(cluster: dict) -> None:  # TLS, but no certificate of Envoy's: refused too
            with_client_cert(cluster)
            del cluster["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
        url, admin = envoy_for(stack, without_client_cert, ready=False)
        with pytest.raises(openai.APIConnectionError):
            ask(url)
        assert not chat.requests[1:]
    finally:
        stack.stop()


def test_envoy_health_checks_the_sidecar_over_grpc(chat, tmp_path):
    """Envoy's gRPC health checker (grpc.health.v1) on the extproc cluster, for the ext_proc service: the
    sidecar answers SERVING, so the host is healthy and requests are processed; a service it does not
    serve is not healthy."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SIDECAR.format(listen=f"127.0.0.1:{port}", admin=free_port(), tls="", chat=chat.address))
    stack = Stack()
    try:
        wait_for_port(port, proc=stack.start_sidecar(cfg))

        def checked(service: str):
            def patch(cluster: dict) -> None:
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                    "port_value"] = port
                cluster["health_checks"] = [{"timeout": "1s", "interval": "0.1s", "unhealthy_threshold": 1,
                                             "healthy_threshold": 1, "grpc_health_check": {"service_name": service}}]
            return patch

        def until(admin: int, passed: str, healthy: int) -> None:
            deadline = time.monotonic() + 20
            while _stat(admin, f"cluster.extproc.health_check.{passed}") < 2 \
                    or _stat(admin, "cluster.extproc.membership_healthy") != healthy:
                assert time.monotonic() < deadline, f"no health check {passed}"
                time.sleep(0.05)

        admin = free_port()
        url = envoy_for(stack, checked("envoy.service.ext_proc.v3.ExternalProcessor"), admin=admin)
        until(admin, "success", 1)
        assert _stat(admin, "cluster.extproc.health_check.failure") == 0
        assert ask(url) == "echo: over the socket"
        admin = free_port()
        envoy_for(stack, checked("not.a.Service"), admin=admin)
        until(admin, "failure", 0)
    finally:
        stack.stop()


def test_more_requests_at_once_than_an_http2_default_of_100_streams(gw):
    """Envoy opens one ext_proc stream per request in flight, on one connection per worker (two
    here): 500 translated requests held by the backend at once, so well over 100 on each connection,
    all reach it and are all answered (h2's own limit of 100 streams, which the gRPC server kept, had
    some refused: a 500 or 503 from the gateway; 250 at once were not enough to show it)."""
    import asyncio
    import threading

    from extproc.local.stack import wait_until

    n, hold = 500, threading.Event()
    gw.chat.script.extend(Reply(text=f"answer {i}", hold=hold) for i in range(n))

    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=60)
        asks = [asyncio.create_task(client.responses.create(model="llama-3", input="go")) for _ in range(n)]
        reached = await asyncio.to_thread(wait_until, lambda: len(gw.chat.requests) == n, 45)
        hold.set()
        answers = await asyncio.gather(*asks)
        assert reached, f"{len(gw.chat.requests)} of {n} requests reached the backend while all were held"
        return [a.output_text for a in answers]

    try:
        texts = asyncio.run(ask_all())
    finally:
        hold.set()
    assert sorted(texts) == sorted(f"answer {i}" for i in range(n))
