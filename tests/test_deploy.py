"""The files users deploy with, checked as they are: docker-compose.yml (against the compose spec, and
run natively: each service's command with the same files, ports and environment), the Dockerfile
(hadolint), the Kubernetes manifests (Kubernetes schemas, offline), every Envoy config (envoy --mode
validate) and every sidecar config (check-config)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from extproc.config import parse_config
from extproc.local.stack import REPO, Stack, find_envoy, free_port, wait_for_envoy, wait_for_port

BIN = Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yml"


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is missing: scripts/test.sh installs it with the test extras"
    return path


def test_compose_file_follows_the_compose_spec():
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_lints_clean():
    out = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_manifests_validate_offline():
    import kubernetes_validate

    kustomization = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())
    for rel in kustomization["resources"]:
        for doc in yaml.safe_load_all((REPO / "deploy" / rel).read_text()):
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
    for gen in kustomization["configMapGenerator"]:
        for entry in gen["files"]:
            assert (REPO / "deploy" / entry.rpartition("=")[2]).exists(), entry


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "deploy").rglob("*.yaml")
                                        if "static_resources" in p.read_text()))
def test_envoy_configs_validate(path):
    out = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(REPO / path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


SIDECAR_CONFIGS = ["deploy/config.yaml", "deploy/config.redis.yaml", "deploy/k8s/extproc-config.yaml"]


@pytest.mark.parametrize("path", SIDECAR_CONFIGS)
def test_sidecar_configs_are_valid(path, monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k)
                        if host.endswith(".svc.cluster.local") else real(host, *a, **k))  # no cluster DNS here
    cfg = parse_config((REPO / path).read_text(), source=path, env={"OPENAI_API_KEY": "sk-test"})
    assert cfg.backends


def _expand(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR}, from the given environment."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "", value)


def native_command(service: dict, env: dict[str, str]) -> list[str]:
    """A compose service's command run here: image entrypoints become local programs, container
    paths become the repo files mounted there."""
    mounts = {}
    for volume in service.get("volumes", ()):
        host, container = volume.split(":")[:2]
        mounts[container] = str((REPO / host).resolve())
    args = [mounts.get(_expand(a, env), _expand(a, env)) for a in service["command"]]
    if args[0] == "envoy":
        return [find_envoy(), *args[1:]]
    return [sys.executable, "-m", "extproc", *args]  # the sidecar image's ENTRYPOINT is `extproc`


def test_compose_services_run_natively():
    compose = yaml.safe_load(COMPOSE.read_text())
    ports = [10000, 9901, 50051, 8001, 9902]  # what the compose stack and deploy/*.yaml use
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is in use: stop what runs there (extproc stack?)"
    stack = Stack()
    try:
        for name in ("sidecar", "demo-backend", "envoy"):  # compose's depends_on order
            service = compose["services"][name]
            env = {**os.environ, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
            stack.spawn(name, native_command(service, env), env)
            if name == "sidecar":
                wait_for_port(50051, proc=stack.procs[-1])
            elif name == "demo-backend":
                wait_for_port(8001, proc=stack.procs[-1])
        wait_for_envoy(9901)
        client = openai.OpenAI(base_url="http://127.0.0.1:10000/v1", api_key="k", max_retries=0, timeout=30)
        assert client.responses.create(model="demo", input="hello compose").output_text == "You said: hello compose"
        chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "You said: hi"
        assert [m.id for m in client.models.list()] == ["demo", "demo-codex"]
        codex = client.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "hi"}])
        assert codex.choices[0].message.content == "You said: hi"
    finally:
        stack.stop()


def test_readme_stack_command_runs_and_stops_cleanly():
    """`extproc stack`, the README's run command: answers at once, and SIGTERM stops every process."""
    port, demo = free_port(), free_port()
    config = REPO / "deploy" / "config.yaml"
    text = config.read_text().replace("127.0.0.1:8001", f"127.0.0.1:{demo}")
    cfg = Path(os.environ.get("TMPDIR", "/tmp")) / f"stack-test-{port}.yaml"
    cfg.write_text(text + f"admin_listen: 127.0.0.1:{free_port()}\n")
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "stack", "--config", str(cfg), "--port", str(port),
                             "--demo-port", str(demo)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=10)
                assert client.responses.create(model="demo", input="hi").output_text == "You said: hi"
                break
            except openai.APIError:
                assert time.monotonic() < deadline
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        cfg.unlink()
    assert "Gateway ready at" in out
    for p in (port, demo):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"something still listens on {p} after SIGTERM"
