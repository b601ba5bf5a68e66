"""End to end: the fast path. Envoy (deploy/envoy.yaml) gets its routes from the sidecar over ADS and
sends requests that need neither translation nor state straight to their backend, the processor
never asked; their usage still reaches the sidecar's metrics through the access-log service. Models
move between the paths live, on a config reload and when their API is learned, and Envoy's choice
agrees with the sidecar's own classification for every kind of name."""

from __future__ import annotations

import contextlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.api import CHAT, RESPONSES
from extproc.config import parse_config
from extproc.local.stack import Stack, free_port, wait_for_port
from extproc.routing.classify import Classifier
from extproc.routing.compile import decide
from extproc.routing.modes import Knowledge, Learned, parse_models

from .conftest import metric
from .upstreams import ChatServer, MessagesServer, MixedServer, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: chat
    api: chat
    models: ["llama-*", {moved_here}]
    endpoints: ["{chat}"]
  - name: resp
    api: responses
    models: ["gpt-5.3-codex", "resp-*", {moved_there}]
    endpoints: ["{resp}"]
  - name: mixed
    api: auto
    models: ["mix-*"]
    endpoints: ["{mixed}"]
  - name: anth
    api: messages
    models: ["anth-*"]
    endpoints: ["{anth}"]
model_rules:
  - match: "llama-r*"
    mode: responses
"""
MIXED_MODELS = [{"id": "mix-chat", "supported_endpoints": ["/v1/chat/completions"]},
                {"id": "mix-resp", "supported_endpoints": ["/v1/responses"]}]


@dataclass
class Fast:
    url: str
    admin: str
    envoy_admin: str
    config: Path
    render: dict
    stack: Stack
    servers: dict  # backend name -> test upstream

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=30)

    def envoy_stat(self, name: str) -> int:
        with urllib.request.urlopen(f"{self.envoy_admin}/stats?filter=^{name}$&format=json", timeout=5) as r:
            stats = json.loads(r.read())["stats"]
        return int(stats[0]["value"]) if stats else 0

    def processed(self) -> int:
        """ext_proc streams Envoy opened: one per request that reached the processor."""
        return self.envoy_stat("http.llm.ext_proc.streams_started")

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.admin, name, **labels)

    def learned(self) -> dict[tuple[str, str], Learned]:
        with urllib.request.urlopen(self.admin + "/learned", timeout=5) as r:
            facts = json.loads(r.read())
        return {tuple(k.split(":", 1)): Learned(v["mode"], set(v["ok"])) for k, v in facts.items()}

    def reconfigure(self, **render: str) -> None:
        self.config.write_text(CONFIG.format(**{**self.render, **render}))
        self.sidecar.send_signal(signal.SIGHUP)

    @property
    def sidecar(self):
        return next(p for p in self.stack.procs if "serve" in p.args)


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fast]:
    chat, resp = ChatServer(), ResponsesServer()
    mixed = MixedServer(responses_only={"mix-resp", "mix-learn-resp"}, chat_only={"mix-chat"}, models=MIXED_MODELS)
    anth = MessagesServer()
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    render = {"extproc": extproc, "admin": admin, "chat": chat.address, "resp": resp.address,
              "mixed": mixed.address, "anth": anth.address, "moved_here": '"moved-1"', "moved_there": '"resp-only"'}
    cfg = Path(tmp_path_factory.mktemp("fast")) / "config.yaml"
    cfg.write_text(CONFIG.format(**render))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(extproc, proc=sidecar)
        wait_for_port(admin, proc=sidecar)
        stack.start_envoy(port, envoy_admin, extproc)  # ready only once the sidecar's routes arrived
        yield Fast(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{envoy_admin}", cfg,
                   render, stack, {"chat": chat, "resp": resp, "mixed": mixed, "anth": anth})
    finally:
        stack.stop()
        for server in (chat, resp, mixed, anth):
            server.close()


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_fast_path_skips_the_processor_and_still_counts_usage(fast):
    client = fast.client()
    before = fast.processed(), fast.metric("extproc_phase_seconds_count")
    # Model labels are the configured name or pattern a model matched (bounded, as for processed requests).
    tokens = {kind: fast.metric("extproc_tokens_total", model="llama-*", kind=kind) for kind in
              ("input", "output", "cached", "reasoning")}
    resp_in = fast.metric("extproc_tokens_total", model="resp-*", kind="input")
    assert client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}]) \
        .choices[0].message.content == "echo: hi"
    stream = client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "yo"}], stream=True,
                                            stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: yo"
    assert client.responses.create(model="resp-1", input="hi", store=False).output_text == "echo: hi"
    with client.responses.stream(model="resp-1", input="hey", store=False) as s:
        assert s.get_final_response().output_text == "echo: hey"
    assert (fast.processed(), fast.metric("extproc_phase_seconds_count")) == before  # never asked
    # The test upstreams report 11 input / 7 output / 3 cached / 2 reasoning tokens per answer.
    want = {"input": 22, "output": 14, "cached": 6, "reasoning": 4}
    eventually(lambda: {k: fast.metric("extproc_tokens_total", model="llama-*", kind=k) - v for k, v in tokens.items()}
               == want, "usage of two fast-path chat answers counted")
    eventually(lambda: fast.metric("extproc_tokens_total", model="resp-*", kind="input") - resp_in == 22,
               "usage of two fast-path Responses answers counted")
    assert fast.metric("extproc_requests_total", model="llama-*", client_api="chat", backend="chat", outcome="ok") >= 2


def test_messages_to_a_messages_backend_take_the_fast_path_and_count_usage(fast):
    import anthropic

    client = anthropic.Anthropic(base_url=fast.url, api_key="k", max_retries=0, timeout=30)
    before = fast.processed()
    tokens = {kind: fast.metric("extproc_tokens_total", model="anth-*", kind=kind) for kind in ("input", "output", "cached")}
    out = client.messages.create(model="anth-1", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert out.content[0].text == "echo: hi"
    with client.messages.stream(model="anth-1", max_tokens=16, messages=[{"role": "user", "content": "yo"}]) as s:
        assert s.get_final_message().content[0].text == "echo: yo"
    assert fast.processed() == before  # never asked
    # The Anthropic test upstream reports 8 uncached + 3 cached input tokens and 7 output per answer:
    # counted as OpenAI counts them, 11 input of which 3 cached.
    want = {"input": 22, "output": 14, "cached": 6}
    eventually(lambda: {k: fast.metric("extproc_tokens_total", model="anth-*", kind=k) - v for k, v in tokens.items()}
               == want, "usage of two fast-path Messages answers counted")
    assert _path_of(fast, lambda: fast.client().chat.completions.create(
        model="anth-1", messages=[{"role": "user", "content": "a"}])) == "processor"  # translated


def test_state_translation_and_uncountable_streams_keep_the_processor(fast):
    client = fast.client()
    before = fast.processed()
    first = client.responses.create(model="resp-1", input="one")  # stored: its id is recorded
    second = client.responses.create(model="resp-1", input="two", previous_response_id=first.id, store=False)
    assert second.output_text == "echo: two"
    assert client.responses.create(model="llama-3", input="x", store=False).output_text == "echo: x"  # translated
    stream = client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "s"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: s"  # usage estimated
    assert fast.processed() - before == 4


def test_client_routing_headers_never_route_the_fast_path(fast):
    chat, resp = fast.servers["chat"], fast.servers["resp"]
    n_chat, n_resp = len(chat.requests), len(resp.requests)
    client = fast.client()
    client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "x"}],
                                   extra_headers={"x-gateway-destination-endpoint": fast.servers["resp"].address,
                                                  "x-gateway-cluster": "openai"})
    assert (len(chat.requests) - n_chat, len(resp.requests) - n_resp) == (1, 0)
    assert "x-gateway-destination-endpoint" not in {k.lower() for k in chat.last["headers"]}


def _post(fast: Fast, path: str, raw: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(fast.url + path, data=raw, method="POST",
                                 headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CHAT_MESSAGES = b'"messages": [{"role": "user", "content": "hi"}]'
TWICE = {  # a body naming `model` twice: Envoy's JSON reader takes the last, a backend's may take the first
    "plain": (b'{"model": "gpt-5.3-codex", "model": "llama-3", ' + CHAT_MESSAGES + b"}", "/v1/chat/completions"),
    "escaped": (b'{"model": "gpt-5.3-codex", "mo\\u0064el": "llama-3", ' + CHAT_MESSAGES + b"}", "/v1/chat/completions"),
    "escaped-first": (b'{"\\u006dodel": "gpt-5.3-codex", "model": "llama-3", ' + CHAT_MESSAGES + b"}",
                      "/v1/chat/completions"),
    "messages": (b'{"model": "llama-3", "model": "anth-1", "max_tokens": 8, ' + CHAT_MESSAGES + b"}", "/v1/messages"),
}


@pytest.mark.parametrize("case", TWICE)
def test_a_body_naming_model_twice_never_takes_the_fast_path(fast, case):
    """Either `model` is one a fast route would take; the processor reads the body itself and refuses the
    duplicated key, in the caller's shape, before any upstream sees it."""
    raw, path = TWICE[case]
    seen = {name: len(server.requests) for name, server in fast.servers.items()}
    before = fast.processed()
    status, doc = _post(fast, path, raw)
    assert status == 400, doc
    if path == "/v1/messages":
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", doc
    else:
        assert doc["error"]["code"] == "duplicate_key", doc
    assert "model" in json.dumps(doc)
    assert fast.processed() == before + 1
    assert {name: len(server.requests) for name, server in fast.servers.items()} == seen


def test_a_model_named_inside_the_body_is_served_as_sent(fast):
    """`model` as a tool's parameter is no duplicate: the request is served, its bytes untouched."""
    raw = (b'{"model": "llama-3", ' + CHAT_MESSAGES + b', "tools": [{"type": "function", "function": {"name": "f", '
           b'"parameters": {"type": "object", "properties": {"model": {"type": "string"}}}}}]}')
    status, doc = _post(fast, "/v1/chat/completions", raw)
    assert status == 200 and doc["choices"][0]["message"]["content"] == "echo: hi", doc
    assert fast.servers["chat"].last["raw"] == raw


def _path_of(fast: Fast, send: Callable[[], object]) -> str:
    before = fast.processed()
    with contextlib.suppress(openai.APIStatusError):  # an unknown model, a rejection: what matters is who answered
        send()
    return "processor" if fast.processed() > before else "fast"


def test_a_model_moves_between_paths_on_reload(fast):
    client = fast.client()

    def chat_moved() -> str:
        return _path_of(fast, lambda: client.chat.completions.create(
            model="moved-1", messages=[{"role": "user", "content": "m"}]))

    assert chat_moved() == "fast"
    fast.reconfigure(moved_here='"llama-x"', moved_there='"moved-1"')  # now a Responses model: translated
    try:
        eventually(lambda: chat_moved() == "processor", "moved-1 through the processor after the reload")
        assert fast.servers["resp"].last["path"] == "/v1/responses"
    finally:
        fast.reconfigure()
    eventually(lambda: chat_moved() == "fast", "moved-1 back on the fast path after the second reload")


def test_a_model_moves_to_the_fast_path_once_its_api_is_learned(fast):
    client = fast.client()

    def ask() -> str:
        return _path_of(fast, lambda: client.chat.completions.create(
            model="mix-learn-chat", messages=[{"role": "user", "content": "l"}]))

    assert ask() == "processor"  # an auto backend, nothing known: the processor watches the answer
    eventually(lambda: ask() == "fast", "mix-learn-chat on the fast path once it answered on chat")
    assert fast.learned()[("mixed", "mix-learn-chat")].ok == {CHAT}


def test_envoy_routes_agree_with_the_classification(fast):
    """Exact, globbed, rule-changed, catalogue, discovered, learned and unknown names, both client APIs:
    the path Envoy takes (the processor asked or not, and which upstream answered) is the one
    Classifier.resolve + decide give for the same config, discoveries and learned facts."""
    client = fast.client()
    cfg = parse_config(fast.config.read_text())
    knowledge = Knowledge()
    knowledge.discover("mixed", parse_models({"data": MIXED_MODELS}))
    names = ["llama-3", "llama-r1", "gpt-5.3-codex", "resp-1", "moved-1", "mix-chat", "mix-resp", "mix-codex-1",
             "mix-learn-chat", "mix-new-c", "mix-new-r", "nope", "resp-only"]
    for name in names:
        for api in (CHAT, RESPONSES):
            if (name, api) in (("mix-new-c", RESPONSES), ("mix-new-r", CHAT)):
                continue  # each never-seen name asked once, on one API, before anything is learned about it
            classifier = Classifier(cfg, knowledge)
            backend = classifier.backend_for(name)
            fact = fast.learned().get((backend.name, name)) if backend else None
            res = classifier.resolve(name, learned=fact) if backend else None
            want = decide(cfg, res, api, fact)
            server = fast.servers[res.backend.name] if res else None
            seen = len(server.requests) if server else 0
            if api == CHAT:
                got = _path_of(fast, lambda n=name: client.chat.completions.create(
                    model=n, messages=[{"role": "user", "content": "a"}]))
            else:
                got = _path_of(fast, lambda n=name: client.responses.create(model=n, input="a", store=False))
            assert got == ("fast" if want.fast else "processor"), (name, api, want.reason)
            if want.fast:
                assert len(server.requests) == seen + 1, (name, api)
