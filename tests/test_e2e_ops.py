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

from .conftest import metric, running
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
  - name: genai
    api: chat
    models: ["genai-*"]
    endpoints: ["{chat}"]
"""
SECRET = "sk-ops-secret-never-logged"
ADMIN_TOKEN = "admin-token-for-tests"


@dataclass
class Ops:
    url: str
    admin: str
    chat: ChatServer
    stack: Stack
    config: Path
    envoy_log: str
    render: dict
    envoy_admin: int

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=30)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.admin, name, **labels)

    def settled(self, name: str, expected: float, **labels: str) -> float:
        """The metric once it reaches `expected` (an exchange is recorded just after its last chunk went
        out), or its value when the deadline passes, for the assertion to show."""
        deadline = time.monotonic() + 10
        while (value := self.metric(name, **labels)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    @property
    def sidecar(self):
        return next(p for p in self.stack.procs if "serve" in p.args)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    chat = ChatServer()
    port, admin, listen, envoy_admin = free_port(), free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("ops")) / "config.yaml"
    render = {"port": port, "admin": admin, "chat": chat.address, "extra": ""}
    cfg.write_text(CONFIG.format(**render))
    env = {"EXTPROC_SHUTDOWN_GRACE": "20", "OPS_UPSTREAM_KEY": SECRET, "EXTPROC_ADMIN_TOKEN": ADMIN_TOKEN}
    with running(cfg, port, listen, servers=(chat,), env=env, ready=(admin,), envoy_admin=envoy_admin) as stack:
        yield Ops(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", chat, stack, cfg, f"envoy-{listen}", render,
                  envoy_admin)


def test_health_and_readiness(ops):
    assert ops.get("/healthz") == (200, "ok\n")
    assert ops.get("/readyz")[0] == 200
    assert ops.get("/nope")[0] == 404


def test_metrics_after_known_traffic(ops):
    client = ops.client()
    before_in = ops.metric("extproc_tokens_total", model="ops-*", kind="input", estimated="false")
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
    assert ops.settled("extproc_requests_total", 2, client_api="responses", upstream_api="chat", model="ops-*") == 2
    assert ops.metric("extproc_requests_total", client_api="chat", upstream_api="chat", model="ops-*", outcome="ok") == 4
    assert ops.metric("extproc_requests_total", model="unknown", outcome="gateway_4xx") == 1
    assert ops.metric("extproc_translations_total", direction="responses_to_chat", stream="true") == 2
    # The test upstream reports 11 input / 7 output / 3 cached / 2 reasoning tokens per answer.
    assert ops.metric("extproc_tokens_total", model="ops-*", kind="input", estimated="false") - before_in == 5 * 11
    assert ops.metric("extproc_tokens_total", model="ops-*", kind="cached", estimated="false") == 5 * 3
    assert ops.metric("extproc_tokens_total", model="ops-*", kind="output", estimated="true") == 10  # 40 bytes / 4
    assert ops.metric("extproc_tokens_total", model="ops-*", kind="input", estimated="true") == 20  # 80 bytes / 4
    assert ops.metric("extproc_phase_seconds_count", phase="request_body") >= 7


def test_genai_metrics_after_known_traffic(ops):
    """The OpenTelemetry GenAI histograms: exact counts and sums, the conventions' buckets, one time to
    first token per stream. Only this test uses the `genai` backend."""
    client = ops.client()
    g = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "genai", "gen_ai_request_model": "genai-*"}
    for i in range(3):  # passed through, usage read on the way: 11 input and 7 output tokens each
        client.chat.completions.create(model=f"genai-{i}", messages=[{"role": "user", "content": "hi"}])
    delay, stall = 0.02, 0.3
    ops.chat.script.append(Reply(text="slow " * 20, delay=delay))  # 20 deltas, `delay` before each
    ops.chat.script.append(Reply(stall=stall))  # nothing at all for `stall` seconds
    for _ in range(2):  # translated streams (Responses client, chat backend)
        with client.responses.stream(model="genai-stream", input="hi") as s:
            for _ in s:
                pass
    ops.chat.script.append(Reply(usage=False, text="x" * 40))  # estimated usage: not a GenAI token count
    client.chat.completions.create(model="genai-est", messages=[{"role": "user", "content": "hi"}])
    ops.chat.script.append(Reply(error=(429, {"error": {"message": "slow down", "type": "rate_limit"}})))
    with pytest.raises(openai.RateLimitError):  # passed through: on the fast path Envoy reports its end
        client.chat.completions.create(model="genai-busy", messages=[{"role": "user", "content": "hi"}])

    assert ops.settled("extproc_requests_total", 1, backend="genai", outcome="upstream_4xx") == 1
    assert ops.settled("gen_ai_server_request_duration_seconds_count", 6, error_type="", **g) == 6
    tokens = "gen_ai_client_token_usage"
    assert ops.metric(tokens + "_count", gen_ai_token_type="input", **g) == 5
    assert ops.metric(tokens + "_sum", gen_ai_token_type="input", **g) == 5 * 11
    assert ops.metric(tokens + "_sum", gen_ai_token_type="output", **g) == 5 * 7
    assert ops.metric(tokens + "_bucket", gen_ai_token_type="input", le="4.0", **g) == 0  # 11 lies in (4, 16]
    assert ops.metric(tokens + "_bucket", gen_ai_token_type="input", le="16.0", **g) == 5
    # genai-* takes the fast path (no API key): Envoy sees the 429 to its end and reports it
    assert ops.metric("gen_ai_server_request_duration_seconds_count", error_type="429", **g) == 1
    ttft = "gen_ai_server_time_to_first_token_seconds"
    assert ops.metric(ttft + "_count", **g) == 2  # one per stream, none for the answers not streamed
    assert ops.metric(ttft + "_sum", **g) >= stall
    tpot = "gen_ai_server_time_per_output_token_seconds"
    assert ops.metric(tpot + "_count", **g) == 2
    # The slow stream's chunks span at least 19 delays (the first may share a message with the role
    # chunk), spread over its 7 - 1 output tokens after the first.
    assert ops.metric(tpot + "_sum", **g) >= 19 * delay / 6


def test_every_dashboard_query_names_an_exported_metric(ops):
    """deploy/grafana's dashboard against a real scrape after the traffic above: each name a panel
    queries is a series the sidecar exports, each gen_ai_* label one it sets."""
    from prometheus_client.parser import text_string_to_metric_families

    from .test_monitoring import dashboard_queries, metric_like_names

    exported, labels = set(), set()
    for fam in text_string_to_metric_families(ops.get("/metrics")[1]):
        exported |= {fam.name + "_total"} if fam.type == "counter" else {fam.name + s for s in ("_bucket", "_sum", "_count")}
        for sample in fam.samples:
            exported.add(sample.name)
            labels |= set(sample.labels)
    for title, expr in dashboard_queries():
        names = metric_like_names(expr)
        assert names - labels, f"panel {title!r} queries no sidecar metric: {expr}"
        assert names <= exported | labels, f"panel {title!r}: {sorted(names - exported - labels)} not exported"


def test_metrics_stay_bounded_whatever_models_clients_name(ops):
    """1,000 random model names, served or not, add no series: models are labelled by the pattern they
    matched, or `unknown`."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    def send(model: str) -> int:
        req = urllib.request.Request(ops.url + "/v1/chat/completions", method="POST", headers={
            "content-type": "application/json"}, data=json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert {send("warm-up-unknown"), send("ops-warm-up")} == {404, 200}  # the series exist from here on
    assert ops.settled("extproc_requests_total", 1, model="unknown", outcome="gateway_4xx") >= 1
    unknown = ops.metric("extproc_requests_total", model="unknown")
    before = len(ops.get("/metrics")[1])
    names = [f"rand-{uuid.uuid4().hex}" for _ in range(900)] + [f"ops-{uuid.uuid4().hex}" for _ in range(100)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, names))
    assert statuses.count(404) == 900 and statuses.count(200) == 100
    assert ops.settled("extproc_requests_total", unknown + 900, model="unknown") == unknown + 900
    text = ops.get("/metrics")[1]
    assert not any(name in text for name in names)
    assert len(text) - before < 400, len(text) - before  # only counts grew a digit or two


def test_admin_port_behaviour(ops):
    """HEAD, 404, 405, and a client that never finishes its request holds up no one."""
    import http.client
    import socket

    host, port = ops.admin.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("HEAD", "/metrics")
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b"" and int(head.getheader("content-length")) > 0
    conn.close()
    assert ops.get("/nope")[0] == 404
    post = urllib.request.Request(ops.admin + "/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(post, timeout=5)
    assert e.value.code == 405
    slow = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert ops.get("/healthz") == (200, "ok\n")
        assert time.monotonic() - t0 < 2
    finally:
        for s in slow:
            s.close()


def test_admin_token_guards_mutating_routes(ops):
    """With EXTPROC_ADMIN_TOKEN set, DELETE /learned needs it (even on loopback); reads do not."""
    def delete(headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(ops.admin + "/learned?model=none:none", method="DELETE", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert delete({})[0] == 401
    assert delete({"authorization": "Bearer wrong"})[0] == 401
    assert delete({"authorization": ADMIN_TOKEN})[0] == 401  # the scheme is part of it
    assert delete({"authorization": "Bearer " + ADMIN_TOKEN}) == (200, b'{"forgotten":[]}')
    assert ops.get("/learned")[0] == 200
    assert ADMIN_TOKEN not in ops.stack.log("sidecar")


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


def test_an_upstream_error_quoting_the_key_reaches_the_client_without_it(ops):
    assert [SECRET in body for body in key_quoting_errors(ops)] == [False, False]


def test_a_compressed_upstream_error_quoting_the_key_is_read_and_scrubbed(ops):
    """Passed through, an error may come compressed (the client accepts gzip): decoded and scrubbed; one
    in an encoding the sidecar cannot read is withheld, since it may quote the key."""
    client = ops.client()
    for encoding, withheld in (("gzip", False), ("br", True)):
        ops.chat.script.append(Reply(gzip=True, content_encoding=encoding, error=(401, {"error": {
            "message": f"Incorrect API key provided: {SECRET}.", "type": "invalid_request_error",
            "code": "invalid_api_key"}})))
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "hi"}])
        body = e.value.response.text
        assert SECRET not in body and "content-encoding" not in e.value.response.headers
        assert ("Incorrect API key provided: [redacted]" in body) is not withheld
        assert (e.value.body["code"] == "upstream_error_withheld") is withheld


def test_upstream_silence_is_bounded_but_a_long_stream_is_not(ops):
    """limits.upstream_timeout_seconds (600 s by default; 1 s here) bounds how long an upstream may stay
    silent: a stalled one is a 504 in the OpenAI shape, while a stream that lasts longer in all but keeps
    sending runs to its end (a total bound would cut it mid-way, with no terminal event). The sidecar
    compiles the bound into Envoy's routes, live."""
    ops.config.write_text(CONFIG.format(**ops.render) + "limits: {upstream_timeout_seconds: 1}\n")
    ops.sidecar.send_signal(signal.SIGHUP)
    try:
        wait_for_route_timeout(ops, "1s")
        client = ops.client()
        for call in (lambda: client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}]),
                     lambda: client.responses.create(model="ops-a", input="x")):  # passed through, then translated
            ops.chat.script.append(Reply(stall=3))
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                call()
            assert e.value.status_code == 504 and time.monotonic() - t0 < 2.5
            assert "did not answer within" in e.value.body["message"]  # JSON in the OpenAI shape either way
        text = " ".join(f"w{i}" for i in range(40))
        ops.chat.script.append(Reply(text=text, delay=0.1))  # 20 deltas 0.1 s apart: 2 s in all
        t0 = time.monotonic()
        chunks = list(client.chat.completions.create(model="ops-a", messages=[{"role": "user", "content": "x"}],
                                                     stream=True))
        assert time.monotonic() - t0 > 1.5
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        ops.chat.script.append(Reply(text=text, delay=0.1))
        with client.responses.stream(model="ops-a", input="x") as stream:  # translated
            final = stream.get_final_response()
        assert final.status == "completed" and final.output_text == text
    finally:
        ops.config.write_text(CONFIG.format(**ops.render))
        ops.sidecar.send_signal(signal.SIGHUP)
        wait_for_route_timeout(ops, "600s")


def wait_for_route_timeout(ops, timeout: str) -> None:
    """Until Envoy's routes (from the sidecar over xDS) carry this idle timeout, and no total one."""
    import json

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops.envoy_admin}/config_dump?resource=dynamic_route_configs",
                                    timeout=5) as r:
            routes = json.loads(r.read())["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
        if all(route["route"]["idle_timeout"] == timeout and route["route"]["timeout"] == "0s" for route in routes
               if route.get("name", "").startswith(("processor:", "fast:")) and route["name"] != "processor:follow"):
            return
        time.sleep(0.05)
    raise AssertionError(f"Envoy's routes never got idle timeout {timeout}")


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
