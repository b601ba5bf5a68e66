"""The files users deploy with, checked as they are: docker-compose.yml (against the compose spec, and
run natively: each service's command with the same files, ports and environment), the Dockerfile
(hadolint), the Kubernetes manifests (Kubernetes schemas, offline), every Envoy config (envoy --mode
validate) and every sidecar config (check-config)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

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


def k8s_objects() -> dict[tuple[str, str], dict]:
    """Every object `kubectl apply -k deploy/` creates from files, by (kind, name)."""
    kustomization = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())
    docs = [d for rel in kustomization["resources"] for d in yaml.safe_load_all((REPO / "deploy" / rel).read_text())]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def containers(objects: dict[tuple[str, str], dict], deployment: str) -> dict[str, dict]:
    return {c["name"]: c for c in objects["Deployment", deployment]["spec"]["template"]["spec"]["containers"]}


def secret_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", ()) if "valueFrom" in e}


def test_kubernetes_admin_port_is_off_the_service():
    objects = k8s_objects()
    admin = {p["containerPort"] for p in containers(objects, "llm-gateway")["extproc"]["ports"]}
    assert admin == {9902}
    service = objects["Service", "llm-gateway"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(80, "http")]
    assert containers(objects, "llm-gateway")["extproc"]["readinessProbe"]["httpGet"]["port"] == "admin"  # probes still


def test_kubernetes_network_policies_deny_by_default():
    """Each pod is covered in both directions; Redis is reached by the gateway pods only and reaches nothing;
    the gateway admits its API port, and the admin port only from the monitoring namespace."""
    objects = k8s_objects()
    policies = {name: d["spec"] for (kind, name), d in objects.items() if kind == "NetworkPolicy"}
    for (kind, name), d in objects.items():
        if kind == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            covering = [p for p in policies.values() if p["podSelector"]["matchLabels"].items() <= labels.items()]
            assert any(set(p["policyTypes"]) == {"Ingress", "Egress"} for p in covering), name
    redis = policies["llm-gateway-redis"]
    assert redis["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llm-gateway"}}}],
                                 "ports": [{"protocol": "TCP", "port": 6379}]}]
    assert redis["egress"] == []
    gateway = policies["llm-gateway"]
    admitted = {p["port"]: rule.get("from") for rule in gateway["ingress"] for p in rule["ports"]}
    assert admitted == {10000: None, 9902: [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]}  # never 50051, the sidecar's gRPC port
    blocks = [t["ipBlock"] for rule in gateway["egress"] for t in rule["to"] if "ipBlock" in t]
    assert all("169.254.0.0/16" in b["except"] and "10.0.0.0/8" in b["except"] for b in blocks)  # no metadata server


def test_kubernetes_redis_password_comes_from_a_secret_only():
    objects = k8s_objects()
    assert not [name for kind, name in objects if kind == "Secret"]  # none ships: the operator creates it
    redis = containers(objects, "llm-gateway-redis")["redis"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    ref = {"name": "llm-gateway-redis", "key": "password"}
    assert secret_env(redis) == {"REDIS_PASSWORD": ref}
    sidecar = secret_env(containers(objects, "llm-gateway")["extproc"])
    assert sidecar["REDIS_PASSWORD"] == ref  # required: no optional flag
    assert sidecar["OPENAI_API_KEY"]["optional"] is True  # a pod without the provider key still starts
    state = yaml.safe_load((REPO / "deploy" / "k8s" / "extproc-config.yaml").read_text())["state"]
    assert state["redis_password_env"] == "REDIS_PASSWORD" and "@" not in state["redis_url"]
    for (_, name), d in objects.items():
        if d["kind"] == "Deployment":
            assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, name


def test_kubernetes_redis_and_sidecar_config_agree_on_the_password(tmp_path, cluster_dns):
    """The manifest's Redis arguments run on Debian's redis-server, and the sidecar's Kubernetes config
    (its redis_url pointed here) stores with the password from the environment, and not with another."""
    from extproc.state.store import StoreUnavailable, open_store

    objects = k8s_objects()
    password = "from-the-secret"
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in containers(objects, "llm-gateway-redis")["redis"]["args"]]
    port = free_port()
    stack = Stack()
    try:
        wait_for_port(port, proc=stack.spawn("redis", [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                                       "--dir", str(tmp_path), *args]))
        text = (REPO / "deploy" / "k8s" / "extproc-config.yaml").read_text().replace(
            "redis://llm-gateway-redis:6379/0", f"redis://127.0.0.1:{port}/0")

        async def roundtrip(env: dict[str, str]) -> list[bytes | None]:
            store = open_store(parse_config(text, env={"OPENAI_API_KEY": "k", **env}).state)
            try:
                await store.write([("k8s", b"ok")])
                return await store.get_many(("k8s",))
            finally:
                await store.close()
        assert asyncio.run(roundtrip({"REDIS_PASSWORD": password})) == [b"ok"]
        with pytest.raises(StoreUnavailable):
            asyncio.run(roundtrip({"REDIS_PASSWORD": "guess"}))
    finally:
        stack.stop()


def test_sidecar_image_is_the_one_compose_builds():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["sidecar"]
    assert "build" in compose and compose["image"] == f"llm-api-bridge-extproc:{version}"
    assert containers(k8s_objects(), "llm-gateway")["extproc"]["image"] == compose["image"]


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "deploy").rglob("*.yaml")
                                        if "static_resources" in p.read_text()))
def test_envoy_configs_validate(path):
    out = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(REPO / path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


SIDECAR_CONFIGS = ["deploy/config.yaml", "deploy/config.redis.yaml", "deploy/k8s/extproc-config.yaml"]


@pytest.fixture
def cluster_dns(monkeypatch):
    """Cluster DNS names resolve to loopback: there is no cluster DNS here."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k)
                        if host.endswith(".svc.cluster.local") else real(host, *a, **k))


@pytest.mark.parametrize("path", SIDECAR_CONFIGS)
def test_sidecar_configs_are_valid(path, cluster_dns):
    cfg = parse_config((REPO / path).read_text(), source=path, env={"OPENAI_API_KEY": "sk-test", "REDIS_PASSWORD": "pw"})
    assert cfg.backends


def _expand(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR}, from the given environment."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "", value)


def remap_ports(node: Any, ports: dict[int, int]) -> Any:
    """A YAML document with each port in `ports` moved: `port_value` fields and `host:port` strings."""
    if isinstance(node, dict):
        return {k: ports.get(v, v) if k == "port_value" else remap_ports(v, ports) for k, v in node.items()}
    if isinstance(node, list):
        return [remap_ports(v, ports) for v in node]
    if isinstance(node, str):
        return re.sub(r"(?<=:)\d+$", lambda m: str(ports.get(int(m.group()), m.group())), node)
    return node


def native_command(service: dict, env: dict[str, str], ports: dict[int, int], workdir: Path) -> list[str]:
    """A compose service's command run here: image entrypoints become local programs, container
    paths become the repo files mounted there, and every port the stack uses moves by `ports`, the same
    in each file and argument (files that disagree about a port still disagree)."""
    mounts = {}
    for volume in service.get("volumes", ()):
        host, container = volume.split(":")[:2]
        copy = workdir / container.strip("/").replace("/", "_")
        copy.write_text(yaml.safe_dump(remap_ports(yaml.safe_load((REPO / host).read_text()), ports)))
        mounts[container] = str(copy)
    args = [mounts.get(a, a) for a in (_expand(a, env) for a in service["command"])]
    args = [str(ports.get(int(a), a)) if a.isdigit() else a for a in args]
    if args[0] == "envoy":  # other copies of this test may run on the machine at once
        return [find_envoy(), *args[1:], "--disable-hot-restart"]
    return [sys.executable, "-m", "extproc", *args]  # the sidecar image's ENTRYPOINT is `extproc`


# What the compose stack and deploy/*.yaml use: Envoy's listener and admin, the sidecar's gRPC, admin
# (admin_listen's default, which the Dockerfile's HEALTHCHECK asks) and WebSocket front door
# (websocket_listen's default), the demo backend.
LISTENER, ENVOY_ADMIN, EXTPROC, ADMIN, WEBSOCKET, DEMO = 10000, 9901, 50051, 9902, 50052, 8001


def test_compose_services_run_natively(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    ports = {p: free_port() for p in (LISTENER, ENVOY_ADMIN, EXTPROC, ADMIN, WEBSOCKET, DEMO)}  # never the fixed ones
    defaults = {"EXTPROC_ADMIN_LISTEN": f"127.0.0.1:{ports[ADMIN]}",  # the config's defaults, moved likewise
                "EXTPROC_WEBSOCKET_LISTEN": f"127.0.0.1:{ports[WEBSOCKET]}",
                "EXTPROC_WEBSOCKET_GATEWAY": f"http://127.0.0.1:{ports[LISTENER]}"}
    stack = Stack()
    try:
        for name in ("sidecar", "demo-backend", "envoy"):  # compose's depends_on order
            service = compose["services"][name]
            env = {**os.environ, **{k: str(v) for k, v in (service.get("environment") or {}).items()}, **defaults}
            stack.spawn(name, native_command(service, env, ports, tmp_path), env)
            if name == "sidecar":
                wait_for_port(ports[EXTPROC], proc=stack.procs[-1])
            elif name == "demo-backend":
                wait_for_port(ports[DEMO], proc=stack.procs[-1])
        wait_for_envoy(ports[ENVOY_ADMIN])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[LISTENER]}/v1", api_key="k", max_retries=0,
                               timeout=30)
        assert client.responses.create(model="demo", input="hello compose").output_text == "You said: hello compose"
        chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "You said: hi"
        assert [m.id for m in client.models.list()] == ["demo", "demo-codex"]
        codex = client.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "hi"}])
        assert codex.choices[0].message.content == "You said: hi"
    finally:
        stack.stop()


def start_stack(config: Path, *args: str) -> tuple[subprocess.Popen, dict[str, int]]:
    """`extproc stack` with these arguments, once it says it is ready; the ports its banner names."""
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "stack", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # ends when the stack exits: it gives up by itself if a part never starts
        seen.append(line)
        if line.startswith("Gateway ready at"):
            break
    banner = "".join(seen)
    found = re.search(r"Envoy admin http://127\.0\.0\.1:(\d+), sidecar gRPC 127\.0\.0\.1:(\d+), sidecar admin "
                      r"http://127\.0\.0\.1:(\d+).*\nGateway ready at http://127\.0\.0\.1:(\d+)", banner)
    assert found, banner
    return proc, dict(zip(("envoy_admin", "extproc", "admin", "listen"), map(int, found.groups()), strict=True))


def test_readme_stack_command_runs_side_by_side_and_stops_cleanly(tmp_path):
    """`extproc stack`, the README's run command, twice at once (the second uses the first's demo
    backend): each answers at once, prints the free ports it took, and SIGTERM stops every process."""
    port, demo = free_port(), free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text((REPO / "deploy" / "config.yaml").read_text().replace("127.0.0.1:8001", f"127.0.0.1:{demo}"))
    procs = []
    try:
        first = start_stack(cfg, "--port", str(port), "--demo-port", str(demo))
        procs.append(first[0])
        second = start_stack(cfg, "--port", str(free_port()), "--demo-port", "0")
        procs.append(second[0])
        assert first[1]["listen"] == port
        assert not set(first[1].values()) & set(second[1].values())
        for _, ports in (first, second):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/healthz", timeout=5) as r:
                assert r.read() == b"ok\n"
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['envoy_admin']}/ready", timeout=5) as r:
                assert r.read() == b"LIVE\n"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['listen']}/v1", api_key="k", max_retries=0,
                                   timeout=10)
            assert client.responses.create(model="demo", input="hi").output_text == "You said: hi"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=30)
    for p in [demo, *first[1].values(), *second[1].values()]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"something still listens on {p} after SIGTERM"


def test_local_stack_keeps_provider_tls_verified_on_any_host(tmp_path):
    """deploy/envoy.yaml names Debian's CA bundle; on a host without it the local stack uses this host's
    bundle instead, and never drops the verification."""
    from extproc.local.stack import ENVOY_YAML, render_envoy_config

    def tls(text: str) -> dict:
        cluster = next(c for c in yaml.safe_load(text)["static_resources"]["clusters"] if c["name"] == "openai")
        return cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]

    repo = tls(ENVOY_YAML.read_text())
    assert repo["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
    assert repo["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}]
    elsewhere = tmp_path / "envoy.yaml"
    elsewhere.write_text(ENVOY_YAML.read_text().replace("/etc/ssl/certs/ca-certificates.crt", "/nonexistent/ca.pem"))
    local = tls(render_envoy_config(1, 2, 3, src=elsewhere))
    assert Path(local["trusted_ca"]["filename"]).is_file()
    assert local["match_typed_subject_alt_names"] == repo["match_typed_subject_alt_names"]
