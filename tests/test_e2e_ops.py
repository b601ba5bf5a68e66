"""End to end: what an operator sees. Health, readiness, metrics after known traffic, the access-log
line with usage, graceful shutdown with a stream in flight, config reload (SIGHUP and file change)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port, wait_until

from .upstreams import ChatServer, Reply

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: local
    api: chat
    models: ["ops-*"{extra}]
    endpoints: ["{chat}"]
    api_key_env: OPS_UPSTREAM_KEY
"""
SECRET = "sk-ops-secret-never-logged"


@dataclass
class Ops:
    url: str
    admin: str
    chat: ChatServer
    stack: Stack
    config: Path
    envoy_log: str
    render: dict

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=30)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    @property
    def sidecar(self):
        return next(p for p in self.stack.procs if "serve" in p.args)

    @staticmethod
    def stack_envoy() -> str:
        from extproc.local.stack import find_envoy
        return find_envoy()


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    chat = ChatServer()
    port, admin, listen = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("ops")) / "config.yaml"
    render = {"port": port, "admin": admin, "chat": chat.address, "extra": ""}
    cfg.write_text(CONFIG.format(**render))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg, env={"EXTPROC_SHUTDOWN_GRACE": "20", "OPS_UPSTREAM_KEY": SECRET})
        wait_for_port(port, proc=sidecar)
        wait_for_port(admin, proc=sidecar)
        stack.start_envoy(listen, free_port(), port)
        yield Ops(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", chat, stack, cfg, f"envoy-{listen}", render)
    finally:
        stack.stop()
        chat.close()


def test_health_and_readiness(ops):
    assert ops.get("/healthz") == (200, "ok\n")
    assert ops.get("/readyz")[0] == 200
    assert ops.get("/nope")[0] == 404


def test_metrics_after_known_traffic(ops):
    client = ops.client()
    before_in = ops.metric("extproc_tokens_total", model="ops-a", kind="input", estimated="false")
    for _ in range(3):  # pass-through, usage read from the answer
        client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "hi"}])
    for _ in range(2):  # translated, streamed
        with client.responses.stream(model="ops-a", input="hi") as s:
            for _ in s:
                pass
    ops.chat.script.append(Reply(usage=False, text="x" * 40))  # no usage from the upstream: estimated
    client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "y" * 80}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    wait_until(lambda: ops.metric("extproc_requests_total", model="ops-a") + ops.metric(
        "extproc_requests_total", model="nope") >= 7)  # counted as each exchange ends, maybe after its answer
    assert ops.metric("extproc_requests_total", client_api="chat", upstream_api="chat", model="ops-a", outcome="ok") == 4
    assert ops.metric("extproc_requests_total", client_api="responses", upstream_api="chat", model="ops-a") == 2
    assert ops.metric("extproc_requests_total", model="nope", outcome="gateway_4xx") == 1
    assert ops.metric("extproc_translations_total", direction="responses_to_chat", stream="true") == 2
    # The test upstream reports 11 input / 7 output / 3 cached / 2 reasoning tokens per answer.
    assert ops.metric("extproc_tokens_total", model="ops-a", kind="input", estimated="false") - before_in == 5 * 11
    assert ops.metric("extproc_tokens_total", model="ops-a", kind="cached", estimated="false") == 5 * 3
    assert ops.metric("extproc_tokens_total", model="ops-a", kind="output", estimated="true") == 10  # 40 bytes / 4
    assert ops.metric("extproc_tokens_total", model="ops-a", kind="input", estimated="true") == 20  # 80 bytes / 4
    assert ops.metric("extproc_phase_seconds_count", phase="request_body") >= 7


def test_access_log_carries_usage(ops):
    ops.client().chat.completions.create(model="ops-log", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in ops.stack.log(ops.envoy_log).splitlines() if line.startswith("{")]
        records = [r for r in records if r["model"] == "ops-log"]
        if records:
            break
        time.sleep(0.1)
    assert {k: records[-1][k] for k in ("client_api", "upstream_api", "input_tokens", "output_tokens", "cached_tokens",
                                        "reasoning_tokens", "usage_estimated", "backend", "status", "path")} == {
        "client_api": "chat", "upstream_api": "chat", "input_tokens": 11, "output_tokens": 7, "cached_tokens": 3,
        "reasoning_tokens": 2, "usage_estimated": False, "backend": "local", "status": 200,
        "path": "/v1/chat/completions"}


def answers(client: openai.OpenAI, model: str) -> bool:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError:
        return False
    return True


def test_reload_on_file_change_keeps_streams(ops):
    client = ops.client()
    assert not answers(client, "late-model")
    held = threading.Event()
    ops.chat.script.append(Reply(text="slow " * 50, hold=held))  # open until the reload is done
    got: list[str] = []

    def stream() -> None:
        r = client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}], stream=True)
        got.append("".join(c.choices[0].delta.content or "" for c in r if c.choices))

    before = len(ops.chat.requests)
    t = threading.Thread(target=stream)
    t.start()
    try:
        assert wait_until(lambda: len(ops.chat.requests) > before), "the stream did not reach the upstream"
        ops.config.write_text(CONFIG.format(**{**ops.render, "extra": ', "late-model"'}))  # no SIGHUP: the file is watched
        assert wait_until(lambda: answers(client, "late-model"), timeout=15, interval=0.3), "config change not picked up"
        assert t.is_alive() and not got  # the stream was in flight across the reload
    finally:
        held.set()
        t.join(timeout=30)
    assert got == [("slow " * 50)]
    ops.config.write_text(CONFIG.format(**ops.render))


def replace_unseen(path: Path, text: str) -> None:
    """New content of the same size and modification time: the file watcher sees no change, so only
    SIGHUP can apply it."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    tmp = path.with_suffix(".next")
    tmp.write_text(text)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)  # at once: never a moment with another size or time


def test_sighup_reloads_and_an_invalid_file_keeps_the_running_config(ops):
    client = ops.client()
    config = CONFIG.format(**{**ops.render, "extra": ', "hup-a"'})
    ops.config.write_text(config)
    assert wait_until(lambda: answers(client, "hup-a"), timeout=15, interval=0.3), "config change not picked up"
    try:
        replace_unseen(ops.config, config.replace("hup-a", "hup-b"))
        ops.sidecar.send_signal(signal.SIGHUP)
        assert wait_until(lambda: answers(client, "hup-b"), interval=0.2), "SIGHUP did not reload the config"
        assert not answers(client, "hup-a")
        rejected = ops.stack.log("sidecar").count("config reload rejected")
        invalid = "backends: [\n"
        replace_unseen(ops.config, invalid + "#" * (len(config) - len(invalid)))
        ops.sidecar.send_signal(signal.SIGHUP)
        assert wait_until(lambda: ops.stack.log("sidecar").count("config reload rejected") > rejected), \
            "SIGHUP did not read the invalid file"
        assert answers(client, "hup-b")  # the running config is kept
    finally:
        ops.config.write_text(CONFIG.format(**ops.render))


def key_quoting_errors(ops: Ops) -> list[str]:
    """What the client gets when the upstream rejects the key and quotes it, as some providers do:
    the error bodies of a passed-through and of a translated request."""
    client = ops.client()
    bodies = []
    for call in (lambda: client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.responses.create(model="ops-a", input="hi")):
        ops.chat.script.append(Reply(error=(401, {"error": {"message": f"Incorrect API key provided: {SECRET}.",
                                                            "type": "invalid_request_error", "code": "invalid_api_key"}})))
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        bodies.append(e.value.response.text)
    assert all("Incorrect API key provided" in b for b in bodies)  # the upstream's errors do reach the client
    return bodies


def test_secrets_stay_out_of_logs_and_metrics(ops):
    client = ops.client()
    client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "hi"}])
    assert ops.chat.last["headers"]["authorization"] == "Bearer " + SECRET  # it does reach the upstream
    key_quoting_errors(ops)  # the key has passed through the sidecar in both directions
    assert SECRET not in ops.get("/metrics")[1]
    assert SECRET not in ops.stack.log("sidecar") and SECRET not in ops.stack.log(ops.envoy_log)


@pytest.mark.xfail(strict=True, reason="not built yet: the sidecar relays an upstream error that quotes the key "
                                       "it injected (api_key_env) unchanged; remove this mark once it scrubs it")
def test_an_upstream_error_quoting_the_key_reaches_the_client_without_it(ops):
    assert [SECRET in body for body in key_quoting_errors(ops)] == [False, False]


def test_upstream_that_stalls_is_cut_by_the_route_timeout(ops, tmp_path):
    """deploy/envoy.yaml gives upstreams 600 s; here the same config with 1 s shows what a client gets."""
    import yaml

    from extproc.local.stack import render_envoy_config, wait_for_envoy
    port, admin = free_port(), free_port()
    doc = yaml.safe_load(render_envoy_config(port, admin, ops.render["port"]))
    for route in doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"]["virtual_hosts"][0]["routes"]:
        if "route" in route:
            route["route"]["timeout"] = "1s"
    cfg = tmp_path / "envoy-timeout.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    ops.stack.spawn(f"envoy-{port}", [ops.stack_envoy(), "-c", str(cfg), "--log-level", "warn", "--base-id", str(port),
                                      "--disable-hot-restart"])
    wait_for_envoy(admin)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
    for call in (lambda: client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.responses.create(model="ops-a", input="x")):  # passed through, then translated
        ops.chat.script.append(Reply(stall=3))
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == 504 and time.monotonic() - t0 < 2.5
        assert e.value.body["message"] == "upstream request timeout"  # JSON in the OpenAI shape either way


def test_sidecar_killed_then_back(ops):
    """Fail closed while the sidecar is down (clear 5xx, never an unrouted request); back by itself."""
    client = ops.client()
    ops.sidecar.send_signal(signal.SIGKILL)
    ops.sidecar.wait(timeout=10)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"]
    before = len(ops.chat.requests)
    ops.stack.procs.remove(ops.sidecar)
    proc = ops.stack.start_sidecar(ops.config, env={"OPS_UPSTREAM_KEY": SECRET})
    wait_for_port(ops.render["port"], proc=proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}]).choices
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "traffic did not recover"
            time.sleep(0.2)
    assert len(ops.chat.requests) > before


def test_graceful_shutdown_finishes_the_stream_in_flight(ops):
    client = ops.client()
    ops.chat.script.append(Reply(text="tick " * 40, delay=0.05))
    r = client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = iter(r)
    first = next(chunks)
    ops.sidecar.send_signal(signal.SIGTERM)
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tick " * 40
    assert ops.sidecar.wait(timeout=30) == 0
