"""End to end: per-tenant request and token limits, shared by two replicas through a real Redis.

Two Envoys on deploy/envoy.yaml, each with its own sidecar, one redis-server, the official openai SDK.
A tenant over its requests per minute gets a 429 in its API's shape from either replica, with
`retry-after` and OpenAI's `x-ratelimit-*` headers, while another tenant goes on; tokens counted from
fast-path answers (buffered and streamed, via Envoy's access log) and from processor-path answers
(the sidecar's own reading) refuse the tenant's next request on the other replica, per minute and per
day; a WebSocket's turns are requests, its upgrade is not; the per-tenant metrics carry only the
config's tenant names.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from websockets.sync.client import connect

from extproc.local.stack import Stack, free_port, wait_for_port, wait_until

from .conftest import metric
from .test_e2e_surface import ws_turn
from .upstreams import ChatServer

KEYS = {"LIMITED_KEY": "sk-limited", "FREE_KEY": "sk-free", "TPM_KEY": "sk-tpm", "TPM_PROC_KEY": "sk-tpm-proc",
        "BUDGET_KEY": "sk-budget", "SOCKET_KEY": "sk-socket"}
CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
websocket_listen: 127.0.0.1:{ws}
websocket_gateway: http://127.0.0.1:{port}
state: {{store: redis, redis_url: "{redis}"}}
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["{chat}"]
clients:
  - {{key_env: LIMITED_KEY, tenant: limited, requests_per_minute: 3}}
  - {{key_env: FREE_KEY, tenant: free}}
  - {{key_env: TPM_KEY, tenant: tpm, tokens_per_minute: 30}}
  - {{key_env: TPM_PROC_KEY, tenant: tpm-proc, tokens_per_minute: 30}}
  - {{key_env: BUDGET_KEY, tenant: budget, token_budget: {{tokens: 20, per: day}}}}
  - {{key_env: SOCKET_KEY, tenant: socket, requests_per_minute: 2}}
"""
TOKENS = 18  # the test upstream's usage per answer: 11 in, 7 out
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Replica:
    url: str
    admin: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/responses"

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.admin, name, **labels)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[tuple[Replica, Replica]]:
    chat = ChatServer()
    tmp = Path(tmp_path_factory.mktemp("limits"))
    stack = Stack()
    try:
        out = []
        for i in range(2):
            extproc, admin, port, ws = free_port(), free_port(), free_port(), free_port()
            cfg = tmp / f"config-{i}.yaml"
            cfg.write_text(CONFIG.format(extproc=extproc, admin=admin, redis=redis_server.url, chat=chat.address,
                                         ws=ws, port=port))
            wait_for_port(extproc, proc=stack.start_sidecar(cfg, env=KEYS, name=f"sidecar-{i}"))
            wait_for_port(ws)
            stack.start_envoy(port, free_port(), extproc, websocket_port=ws)
            out.append(Replica(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"))
        yield out[0], out[1]
    finally:
        stack.stop()
        chat.close()


@pytest.fixture
def fresh_minute() -> None:
    """Per-minute counters start again at each UTC minute: begin a test with 20s or more of it left."""
    assert wait_until(lambda: time.time() % 60 < 40, timeout=25)


def test_a_tenant_over_its_requests_per_minute_is_refused_by_both_replicas(replicas, fresh_minute):
    a, b = replicas
    seen = [c.chat.completions.with_raw_response.create(model="llama-3", messages=MESSAGES)
            for c in (a.client("sk-limited"), b.client("sk-limited"), a.client("sk-limited"))]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in seen] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in seen)
    reset = seen[-1].headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and float(reset.rstrip("ms").split("m")[-1]) <= 60
    # The fourth, on either replica and on either API (chat here takes the fast path, Responses the processor).
    for call in (lambda: b.client("sk-limited").chat.completions.create(model="llama-3", messages=MESSAGES),
                 lambda: a.client("sk-limited").responses.create(model="llama-3", input="hi")):
        with pytest.raises(openai.RateLimitError) as e:
            call()
        assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
        headers = e.value.response.headers
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(headers["retry-after"]) <= 60
        assert "tenant limited (limit 3)" in e.value.message
    # A streamed request the processor translates gets the 429 as it is, as the SDK expects.
    with pytest.raises(openai.RateLimitError):
        a.client("sk-limited").responses.create(model="llama-3", input="hi", stream=True)
    # Another tenant is not affected, on either replica.
    for replica in (a, b):
        assert replica.client("sk-free").chat.completions.create(model="llama-3", messages=MESSAGES).choices
    assert a.metric("extproc_rate_limited_total", tenant="limited", limit="requests") + \
        b.metric("extproc_rate_limited_total", tenant="limited", limit="requests") == 3


def test_a_sockets_turns_are_requests_and_its_upgrade_is_not(replicas, fresh_minute):
    a, b = replicas
    headers = {"authorization": "Bearer sk-socket"}
    with connect(a.ws_url, additional_headers=headers, open_timeout=30) as ws:
        assert [ws_turn(ws, model="llama-3", input="hi")[-1]["type"] for _ in range(2)] == ["response.completed"] * 2
        (refused,) = ws_turn(ws, model="llama-3", input="hi")
    assert refused["type"] == "error" and refused["status"] == 429
    assert refused["error"]["code"] == "rate_limit_exceeded"
    with connect(b.ws_url, additional_headers=headers, open_timeout=30) as ws:  # over the limit, still a socket
        (refused,) = ws_turn(ws, model="llama-3", input="hi")
    assert refused["status"] == 429


def refused_for_tokens(replica: Replica, key: str) -> openai.RateLimitError | None:
    """The tenant's next request on `replica`, if it is refused (None: it went through)."""
    try:
        replica.client(key).chat.completions.create(model="llama-3", messages=MESSAGES)
    except openai.RateLimitError as e:
        return e
    return None


def refusal(replica: Replica, key: str, timeout: float = 10.0) -> openai.RateLimitError:
    """The tenant's first refused request on `replica`: an answer's tokens are counted just after it."""
    deadline = time.monotonic() + timeout
    while (e := refused_for_tokens(replica, key)) is None:
        assert time.monotonic() < deadline, f"{key} was never refused"
        time.sleep(0.05)
    return e


def test_tokens_of_fast_path_answers_count_toward_the_minutes_limit_on_the_other_replica(replicas, fresh_minute):
    a, b = replicas
    client = a.client("sk-tpm")
    client.chat.completions.create(model="llama-3", messages=MESSAGES)  # buffered: 18 tokens
    stream = client.chat.completions.create(model="llama-3", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    assert [c.usage.total_tokens for c in stream if c.usage] == [TOKENS]  # streamed: 18 more, 36 > 30
    e = refusal(b, "sk-tpm")
    assert e.type == "tokens" and e.code == "rate_limit_exceeded"
    assert e.response.headers["x-ratelimit-limit-tokens"] == "30"
    assert e.response.headers["x-ratelimit-remaining-tokens"] == "0"
    # counted where Envoy logged them (its access-log entries arrive in batches, not with the answer)
    assert wait_until(lambda: a.metric("extproc_tenant_tokens_total", tenant="tpm") >= 2 * TOKENS, timeout=10)
    assert refused_for_tokens(b, "sk-free") is None


def test_tokens_of_processor_path_answers_count_too(replicas, fresh_minute):
    a, b = replicas
    client = a.client("sk-tpm-proc")
    for _ in range(2):  # a Responses client on a chat model: translated by the sidecar, which reads the usage
        assert client.responses.create(model="llama-3", input="hi").usage.total_tokens == TOKENS
    assert refusal(b, "sk-tpm-proc").type == "tokens"


def test_a_daily_token_budget_refuses_until_the_day_ends(replicas):
    a, b = replicas
    a.client("sk-budget").chat.completions.create(model="llama-3", messages=MESSAGES)  # 18 of 20
    b.client("sk-budget").responses.create(model="llama-3", input="hi")  # 36: one request may overshoot
    e = refusal(a, "sk-budget")
    assert e.code == "insufficient_quota" and "token budget of 20 per day" in e.message
    midnight = (int(time.time()) // 86400 + 1) * 86400
    assert abs(int(e.response.headers["retry-after"]) - (midnight - time.time())) < 5
    with pytest.raises(openai.RateLimitError):  # the other API's shape, on the other replica
        b.client("sk-budget").responses.create(model="llama-3", input="hi")
    metrics = urllib.request.urlopen(a.admin + "/metrics", timeout=5).read().decode()
    tenants = {json.loads('"' + part.split('"')[1] + '"') for line in metrics.splitlines()
               if line.startswith("extproc_tenant_") for part in line.split("tenant=")[1:]}
    assert tenants <= {"limited", "free", "tpm", "tpm-proc", "budget", "socket"}
