"""End to end: a WebSocket-mode socket lives `limits.websocket_max_seconds`, then is told so and closed.

Open Responses, WebSocket reconnects: at the limit the server returns an error whose code is
`websocket_connection_limit_reached`. A short limit here (2 s), through the real Envoy and sidecar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from extproc.local.stack import Stack, free_port, wait_for_port

from .conformance import validate
from .upstreams import ChatServer

LIMIT = 2

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: off
websocket_listen: 127.0.0.1:{ws}
websocket_gateway: http://127.0.0.1:{listen}
limits: {{websocket_max_seconds: {limit}}}
backends:
  - {{name: chat, api: chat, models: ["llama-*"], endpoints: ["{chat}"]}}
"""


@pytest.fixture(scope="module")
def ws_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chat = ChatServer()
    port, ws, listen = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("wslimit")) / "config.yaml"
    cfg.write_text(CONFIG.format(port=port, ws=ws, listen=listen, limit=LIMIT, chat=chat.address))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(port, proc=sidecar)
        wait_for_port(ws, proc=sidecar)
        stack.start_envoy(listen, free_port(), port, websocket_port=ws)
        yield f"ws://127.0.0.1:{listen}/v1/responses"
    finally:
        stack.stop()
        chat.close()


def test_a_socket_past_its_limit_gets_the_limit_error_then_closes(ws_url: str):
    with connect(ws_url) as ws:
        opened = time.monotonic()
        ws.send(json.dumps({"type": "response.create", "model": "llama-3", "input": "hi"}))
        while json.loads(ws.recv(timeout=30))["type"] != "response.completed":
            pass
        limit = json.loads(ws.recv(timeout=30))  # nothing more is sent: the server speaks at the limit
        assert time.monotonic() - opened >= LIMIT - 0.5
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    validate("WebSocketErrorEvent", limit)
    assert limit["error"]["code"] == "websocket_connection_limit_reached"
