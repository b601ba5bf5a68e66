"""End to end: the ext_proc listener on a unix socket, and behind mutual TLS, with the real Envoy."""

from __future__ import annotations

import time
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
from .upstreams import ChatServer

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


def envoy_for(stack: Stack, extproc_cluster_patch) -> str:
    port, admin = free_port(), free_port()
    doc = yaml.safe_load(render_envoy_config(port, admin, 1))
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            extproc_cluster_patch(cluster)
    cfg = stack.workdir / f"envoy-{port}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    stack.spawn(f"envoy-{port}", [find_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id", str(port),
                                  "--disable-hot-restart"])
    wait_for_envoy(admin)
    return f"http://127.0.0.1:{port}/v1"


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

        def plain(cluster: dict) -> None:  # no TLS at all: refused, and the request fails closed
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = port
        with pytest.raises(openai.InternalServerError):
            ask(envoy_for(stack, plain))
        assert not chat.requests[1:]
    finally:
        stack.stop()
