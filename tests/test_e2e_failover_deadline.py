"""The overall deadline of a grouped request through the real Envoy with deploy/envoy.yaml (issue 27).

A group of three members, the first slow to fail, the second silent: `failover.deadline_seconds` after
the request was handed over, no attempt starts any more, so the third member is never tried and the
client gets the one error naming the attempts made (a 504: the last of them timed out), in its API's
shape, streamed or not. The same group serves from its third member when the first two fail in time,
and the GenAI metrics of a request failed over name the member that answered and the model its answer
named."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from extproc.local.stack import free_port, wait_until

from .conftest import metric, running
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, deadline_seconds: {deadline}, attempt_timeout_seconds: {attempt_timeout}, eject_after: 50}}
backends:
  - name: slow-chat
    api: chat
    models: ["late"]
    endpoints: ["{slow}"]
  - name: silent-resp
    api: responses
    models: ["late"]
    endpoints: ["{silent}"]
  - name: spare-chat
    api: chat
    models: ["late"]
    endpoints: ["{spare}"]
"""
DEADLINE = 4  # seconds after the hand-over: no attempt starts later
ATTEMPT_TIMEOUT = 3  # a member silent this long is given up on
STALL = 2.0  # the first member's time to fail: the second member begins at STALL, in time (< DEADLINE), and is
# given up on at STALL + ATTEMPT_TIMEOUT, past the deadline, whatever the machine's load adds to either


@dataclass
class Members:
    url: str
    admin: str
    slow: ChatServer
    silent: ResponsesServer
    spare: ChatServer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Members]:
    slow, silent, spare = ChatServer(), ResponsesServer(), ChatServer()
    extproc_port, port, admin_port = free_port(), free_port(), free_port()
    cfg = tmp_path_factory.mktemp("deadline") / "config.yaml"
    cfg.write_text(CONFIG.format(extproc_port=extproc_port, admin_port=admin_port, deadline=DEADLINE,
                                 attempt_timeout=ATTEMPT_TIMEOUT, slow=slow.address, silent=silent.address,
                                 spare=spare.address))
    with running(cfg, extproc_port, port, servers=(slow, silent, spare), ready=(admin_port,)):
        yield Members(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", slow, silent, spare)


@pytest.fixture
def m(stack: Members) -> Members:
    for server in (stack.slow, stack.silent, stack.spare):
        server.reset()
    return stack


def _error(status: int, message: str) -> tuple[int, dict]:
    return status, {"object": "error", "message": message, "type": "ServiceUnavailable", "param": None, "code": status}


def _ask(client: openai.OpenAI, api: str, stream: bool) -> str:
    if api == "chat":
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            chunks = list(client.chat.completions.create(model="late", messages=msgs, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model="late", messages=msgs).choices[0].message.content or ""
    if stream:
        with client.responses.create(model="late", input="hi", stream=True) as s:
            return "".join(e.delta for e in s if e.type == "response.output_text.delta")
    return client.responses.create(model="late", input="hi").output_text


def test_within_the_deadline_the_third_member_serves(m):
    m.slow.script.append(Reply(error=_error(503, "slow pool down")))
    m.silent.script.append(Reply(error=(500, {"error": {"message": "responses pool crashed", "type": "server_error",
                                                        "param": None, "code": None}})))
    m.spare.script.append(Reply(text="served by the third"))
    assert _ask(m.client(), "chat", False) == "served by the third"
    assert (len(m.slow.requests), len(m.silent.requests), len(m.spare.requests)) == (1, 1, 1)


@pytest.mark.parametrize(("api", "stream"), [("chat", False), ("responses", True)])
def test_no_attempt_starts_after_the_deadline(m, api, stream):
    silent = threading.Event()
    m.slow.script.append(Reply(error=_error(503, "slow pool down"), stall=STALL))
    m.silent.script.append(Reply(silent=silent))
    m.spare.script.append(Reply(text="never asked"))
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            _ask(m.client(), api, stream)
        took = time.monotonic() - started
    finally:
        silent.set()
    assert e.value.status_code == 504
    body = e.value.response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "all_backends_timed_out"
    assert body["error"]["message"] == ("every backend of model 'late' failed (2 attempts): slow-chat: 503 slow pool "
                                        f"down; silent-resp: timed out: no answer within {ATTEMPT_TIMEOUT} s")
    # the first two members were tried, each once; the third never was, though it would have served
    assert (len(m.slow.requests), len(m.silent.requests), m.spare.requests) == (1, 1, [])
    assert STALL + ATTEMPT_TIMEOUT <= took < STALL + ATTEMPT_TIMEOUT + 20


def test_the_genai_metrics_name_the_member_that_answered_and_the_model_it_named(m):
    """The Responses member answers a chat client, translated, naming its own model (a provider's dated
    snapshot, not the `late` asked for): the request's token usage is the upstream's 11 and 7, under
    that member and that model; the member that failed counts none."""
    m.slow.script.append(Reply(error=_error(503, "slow pool down")))
    m.silent.script.append(Reply(text="answered", model="resp-snapshot-2026-01-01"))
    assert _ask(m.client(), "chat", False) == "answered"
    g = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "late",
         "gen_ai_response_model": "resp-snapshot-2026-01-01"}
    name = "gen_ai_client_token_usage_sum"
    # recorded once the served attempt's stream closes, which may be just after the client has its answer
    assert wait_until(lambda: metric(m.admin, name, gen_ai_token_type="output", **g) > 0)
    assert metric(m.admin, name, gen_ai_provider_name="silent-resp", gen_ai_token_type="input", **g) == 11
    assert metric(m.admin, name, gen_ai_provider_name="silent-resp", gen_ai_token_type="output", **g) == 7
    assert metric(m.admin, name, gen_ai_provider_name="slow-chat") == 0
