"""End to end: `extproc serve --workers 2` behind one Envoy, sharing conversations through SQLite."""

from __future__ import annotations

import re
import signal
import socket
import sys

import openai
import yaml

from extproc.local.stack import (
    Stack,
    find_envoy,
    free_port,
    free_ports,
    render_envoy_config,
    wait_for_envoy,
    wait_for_port,
)

from .upstreams import ChatServer


def test_two_workers_share_conversations(tmp_path):
    chat = ChatServer()
    base, admin = free_ports(2), free_ports(2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
listen: 127.0.0.1:{base}
admin_listen: 127.0.0.1:{admin}
state: {{store: sqlite, sqlite_path: {tmp_path / 'state.db'}}}
backends:
  - {{name: local, api: chat, models: ["m"], endpoints: ["{chat.address}"]}}
""")
    stack = Stack()
    try:
        sup = stack.spawn("workers", [sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--workers", "2"])
        try:
            wait_for_port(base, proc=sup)
            wait_for_port(base + 1, proc=sup)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"the workers did not start:\n{stack.log('workers')}") from e
        port, envoy_admin = free_port(), free_port()
        doc = yaml.safe_load(render_envoy_config(port, envoy_admin, base))
        for cluster in doc["static_resources"]["clusters"]:
            if cluster["name"] == "extproc":  # both workers, as docs/deploy.md says
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": base + i}}}}
                    for i in range(2)]
        envoy_cfg = tmp_path / "envoy.yaml"
        envoy_cfg.write_text(yaml.safe_dump(doc))
        stack.spawn("envoy", [find_envoy(), "-c", str(envoy_cfg), "--log-level", "warn", "--base-id", str(port),
                              "--disable-hot-restart"])
        wait_for_envoy(envoy_admin)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        prev = None
        for i in range(8):  # Envoy spreads the streams over both workers; every turn needs the one before
            kw = {"previous_response_id": prev} if prev else {}
            prev = client.responses.create(model="m", input=f"turn {i}", **kw).id
        users = [m["content"] for m in chat.last["body"]["messages"] if m["role"] == "user"]
        assert users == [f"turn {i}" for i in range(8)]
        for i in range(2):  # both workers answered (each has its own admin port)
            with socket.create_connection(("127.0.0.1", admin + i), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
            assert re.search(r'extproc_requests_total\{[^}]*client_api="responses"', text), text
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
    finally:
        stack.stop()
        chat.close()
