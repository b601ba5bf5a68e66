"""Shared fixtures: the real stack (Envoy from the wheel + sidecar + strict test upstreams) on loopback.

tests/unit loads this file too and runs without openai, Envoy or the test upstreams (scripts/test.sh
runs it so): those are imported only inside the end-to-end fixtures."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from extproc.local.stack import Stack, free_port, wait_for_port

if TYPE_CHECKING:
    import anthropic
    import openai

    from .upstreams import ChatServer, MessagesServer, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
backends:
  - name: vllm
    api: chat
    models: ["llama-*", "qwen3-8b", "chat-notranslate", "text-embedding-small"]
    endpoints: ["{chat}"]
    api_key_env: VLLM_TEST_KEY
    key_paths: ["/v1/embeddings"]  # its embeddings model gets the key too
  - name: vllm-strict
    api: chat
    models: ["strict-*"]
    endpoints: ["{chat}"]
    hosted_tools: reject
  - name: codex
    api: responses
    models: ["gpt-5.3-codex", "resp-*"]
    endpoints: ["{resp}"]
  - name: claude
    api: messages
    models: ["claude-*"]
    endpoints: ["{msgs}"]
    api_key_env: ANTHROPIC_TEST_KEY
model_rules:
  - match: "resp-notranslate"
    translate: false
  - match: "chat-notranslate"
    translate: false
"""
API_KEY = "sk-test-upstream-secret"
ANTHROPIC_KEY = "sk-ant-test-secret"


@dataclass
class Gateway:
    url: str
    chat: ChatServer
    resp: ResponsesServer
    stack: Stack
    admin: str
    msgs: MessagesServer

    def client(self, **kw) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", **{"max_retries": 0, "timeout": 30, **kw})

    def anthropic(self, **kw) -> anthropic.Anthropic:
        """The official Anthropic client, pointed at the gateway as ANTHROPIC_BASE_URL would."""
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key="client-key", **{"max_retries": 0, "timeout": 30, **kw})


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from .upstreams import ChatServer, MessagesServer, ResponsesServer

    chat, resp, msgs = ChatServer(), ResponsesServer(), MessagesServer(ANTHROPIC_KEY)
    extproc_port, port, admin = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("gw")) / "config.yaml"
    admin_port = free_port()
    cfg.write_text(CONFIG.format(extproc_port=extproc_port, chat=chat.address, resp=resp.address, msgs=msgs.address,
                                 admin_port=admin_port))
    with running(cfg, extproc_port, port, servers=(chat, resp, msgs), envoy_admin=admin,
                 env={"VLLM_TEST_KEY": API_KEY, "ANTHROPIC_TEST_KEY": ANTHROPIC_KEY}) as stack:
        yield Gateway(f"http://127.0.0.1:{port}", chat, resp, stack, f"http://127.0.0.1:{admin_port}", msgs)


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.chat.reset()
    gateway.resp.reset()
    gateway.msgs.reset()
    return gateway


class RedisServer:
    """Debian's redis-server on a free loopback port, no persistence; stop()/start() for outage tests."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = (), tls: bool = False):
        """`args` adds options (--requirepass, --tls-cert-file ...); `tls` serves TLS only, on `port`."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server not found: scripts/test.sh installs Debian's redis-server package")
        self.port = free_port()
        self.url = f"rediss://localhost:{self.port}/0" if tls else f"redis://127.0.0.1:{self.port}/0"
        self.ports = ("--port", "0", "--tls-port", str(self.port)) if tls else ("--port", str(self.port))
        self.args = args
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, *self.ports, "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield server
    finally:
        server.stop()


class Closable(Protocol):
    def close(self) -> None: ...


@contextlib.contextmanager
def running(config: Path, extproc: int, listen: int, *, servers: Iterable[Closable] = (),
            env: dict[str, str] | None = None, ready: Iterable[int] = (), envoy_admin: int | None = None,
            websocket: int | None = None) -> Iterator[Stack]:
    """An end-to-end file's own stack: the sidecar on `config` (its processor on `extproc`, `ready` more
    of its ports to wait for, such as the admin or WebSocket one) and deploy/envoy.yaml's Envoy on
    `listen` in front of it; on exit both stopped and the file's test upstreams `servers` closed."""
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(config, env=env)
        for port in (extproc, *ready):
            wait_for_port(port, proc=sidecar)
        stack.start_envoy(listen, free_port() if envoy_admin is None else envoy_admin, extproc, websocket_port=websocket)
        yield stack
    finally:
        stack.stop()
        for server in servers:
            server.close()


@dataclass
class Replicated:
    """Replicas of the gateway sharing one store, each an Envoy with its own sidecar started by `running`,
    for tests that alternate between them."""

    urls: list[str]
    configs: list[Path]
    stacks: list[Stack]
    ports: list[tuple[int, ...]]  # each sidecar's ports (ext_proc first), waited for when it starts again
    sidecars: list[subprocess.Popen] = field(init=False)

    def __post_init__(self) -> None:
        self.sidecars = [stack.procs[0] for stack in self.stacks]  # `running` starts the sidecar first

    def client(self, i: int, api_key: str = "k") -> openai.OpenAI:
        """A client of replica i."""
        import openai

        return openai.OpenAI(base_url=self.urls[i] + "/v1", api_key=api_key, max_retries=0, timeout=30)

    def clients(self, api_key: str = "k") -> Iterator[openai.OpenAI]:
        """Clients that alternate between the replicas, forever."""
        return itertools.cycle([self.client(i, api_key) for i in range(len(self.urls))])

    def stop_sidecar(self, i: int, crash: bool = False) -> None:
        """Replica i's sidecar stopped (`crash`: killed, as a crash would, its runs dying with it)."""
        proc = self.sidecars[i]
        if crash:
            proc.kill()
        else:
            proc.terminate()
        proc.wait(timeout=10)
        self.stacks[i].procs.remove(proc)

    def start_sidecar(self, i: int) -> None:
        self.sidecars[i] = self.stacks[i].start_sidecar(self.configs[i])
        for port in self.ports[i]:
            wait_for_port(port, proc=self.sidecars[i])


def metric(admin: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with these labels (any others too) on a sidecar's admin port."""
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))
