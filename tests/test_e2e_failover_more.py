"""Failover across a model group's members through the real Envoy with deploy/envoy.yaml (issue 27): what
tests/test_e2e_failover.py does not show.

- Anthropic Messages clients (the official `anthropic` SDK) failing over to a member of another API, a
  chat-only one and a Responses-only one, streamed (the streaming helper's final message) and not, on a
  503 and on a 429 whose `retry-after` holds the member off (`/readyz` shows it `held_off`, the next
  request goes straight to the other member);
- errors another backend would repeat are never failed over: a final 401 and 403 (the client's own key,
  the member keyless), a content-policy refusal, a context-length error, each answered with that
  member's error in the caller's API shape, the second member never called;
- `/readyz` shows a member that keeps failing as `ejected`, and `healthy` again once it is back;
- a Responses conversation pinned to a stateful Responses instance that is gone is never continued
  anywhere else: 503 `pinned_backend_unavailable` (configured, not answering), 409
  `pinned_backend_gone` (no longer configured, whichever member is first), the pinned member's own error
  (no failover); a turn naming another model than the one whose backend stored it goes to that backend
  alone (no member sees it, nor the holder's key), or is a 400 `previous_response_not_found` where the
  model's first member is chat-only;
- a Responses conversation the sidecar holds (a chat-only member) continues on a Responses-only member
  when the chat member dies, the whole history reaching it."""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_until

from .conftest import running
from .upstreams import ChatServer, Reply, ResponsesServer

ATTEMPT_TIMEOUT = 3


@dataclass
class Site:
    url: str
    admin: str
    envoy_admin: str
    servers: dict[str, ChatServer | ResponsesServer]
    stack: Stack
    config: Path
    template: str
    render: dict[str, str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="client-key", max_retries=0, timeout=30)

    def __getitem__(self, name: str) -> Any:
        return self.servers[name]

    def reset(self) -> None:
        for server in self.servers.values():
            server.reset()


@contextlib.contextmanager
def _site(tmp: Path, template: str, servers: dict[str, ChatServer | ResponsesServer],
          env: dict[str, str] | None = None) -> Iterator[Site]:
    """A stack on the config `template`, whose `{name}` fields are the servers' addresses."""
    extproc_port, port, envoy_admin, admin_port = free_port(), free_port(), free_port(), free_port()
    render = {"extproc_port": str(extproc_port), "admin_port": str(admin_port), "attempt_timeout": str(ATTEMPT_TIMEOUT),
              **{name: s.address for name, s in servers.items()}}
    cfg = tmp / "config.yaml"
    cfg.write_text(template.format(**render))
    with running(cfg, extproc_port, port, servers=servers.values(), env=env, envoy_admin=envoy_admin,
                 ready=(admin_port,)) as stack:
        yield Site(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{envoy_admin}",
                   servers, stack, cfg, template, render)


def _readyz(site: Site) -> dict[str, dict[str, Any]]:
    """Each backend's entry in the sidecar's /readyz (which is 200 whatever the upstreams' states)."""
    with urllib.request.urlopen(site.admin + "/readyz", timeout=10) as r:
        assert r.status == 200
        body = json.loads(r.read())
    assert body["status"] == "ready"
    return {b["name"]: b for b in body["backends"]}


def _all_healthy(site: Site) -> bool:
    return all(b["state"] == "healthy" for b in _readyz(site).values())


def _paths(server: ChatServer | ResponsesServer) -> list[str]:
    return [r["path"] for r in server.requests if r.get("method", "POST") == "POST"]


def _vllm_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"object": "error", "message": message, "type": "ServiceUnavailable", "param": None, "code": status}


def _openai_error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- Anthropic Messages clients, and the errors that are final ----------------------------------------

MAIN = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 50, eject_seconds: 1, max_eject_seconds: 5,
            attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: a-chat
    api: chat
    models: ["to-resp", "final-model"]
    endpoints: ["{a_chat}"]
  - name: a-resp
    api: responses
    models: ["to-resp", "final-model"]
    endpoints: ["{a_resp}"]
  - name: b-resp
    api: responses
    models: ["to-chat"]
    endpoints: ["{b_resp}"]
  - name: b-chat
    api: chat
    models: ["to-chat"]
    endpoints: ["{b_chat}"]
"""
# each grouped model: (first member, the member of another API that serves when the first fails)
MEMBERS = {"chat": ("to-chat", "b_resp", "b_chat"), "responses": ("to-resp", "a_chat", "a_resp")}
OWN_PATH = {"a_chat": "/v1/chat/completions", "b_chat": "/v1/chat/completions", "a_resp": "/v1/responses",
            "b_resp": "/v1/responses"}


@pytest.fixture(scope="module")
def main_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    servers: dict[str, ChatServer | ResponsesServer] = {
        "a_chat": ChatServer(), "a_resp": ResponsesServer(), "b_resp": ResponsesServer(), "b_chat": ChatServer()}
    with _site(tmp_path_factory.mktemp("failover-more"), MAIN, servers) as site:
        yield site


@pytest.fixture
def m(main_site: Site) -> Site:
    """The main stack with its servers' scripts and requests cleared and every member in (a hold from a
    retry-after lasts `max_eject_seconds`, 5 s here)."""
    main_site.reset()
    assert wait_until(lambda: _all_healthy(main_site), timeout=10)
    return main_site


def _failure(kind: str, first: str) -> Reply:
    """The first member's failure: a 503, or a 429 asking for 30 s (held off for max_eject_seconds: 5 s,
    long enough for the next request to be made while it lasts)."""
    if kind == "503":
        return Reply(error=_vllm_error(503, "pool overloaded") if "chat" in first else
                     _openai_error(503, "The server is overloaded", "server_error", None))
    return Reply(error=_vllm_error(429, "rate limited") if "chat" in first else
                 _openai_error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded"),
                 headers={"retry-after": "30"})


@pytest.mark.parametrize("serving", ["chat", "responses"])  # the API of the member that serves
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", ["503", "429"])
def test_an_anthropic_client_fails_over_to_a_member_of_another_api(m, serving, stream, failure):
    model, first, second = MEMBERS[serving]
    m[first].script.append(_failure(failure, first))
    m[second].script.append(Reply(text="served by the other API", pieces=4))
    msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    client = m.anthropic()
    if stream:
        with client.messages.stream(model=model, max_tokens=32, messages=msgs) as s:
            streamed = "".join(s.text_stream)
            out = s.get_final_message()
        assert streamed == "served by the other API"
    else:
        out = client.messages.create(model=model, max_tokens=32, messages=msgs)
    assert out.type == "message" and out.role == "assistant" and out.model == model
    assert [(b.type, b.text) for b in out.content] == [("text", "served by the other API")]
    assert out.stop_reason == "end_turn"
    assert out.usage.output_tokens == 7  # the serving member's: 7 completion tokens, 11 prompt ones (3 cached)
    assert out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0) == 11
    # the first member tried once on its own API; then the other, the request translated to its API
    assert _paths(m[first]) == [OWN_PATH[first]] and _paths(m[second]) == [OWN_PATH[second]]
    sent = m[second].requests[0]["body"]
    if serving == "chat":
        assert sent["messages"] == [{"role": "user", "content": "hi"}] and sent["max_completion_tokens"] == 32
        assert sent.get("stream", False) is stream
    else:
        assert sent["max_output_tokens"] == 32 and sent.get("stream", False) is stream
        assert [(i["role"], i["content"]) for i in sent["input"]] in (
            [("user", "hi")], [("user", [{"type": "input_text", "text": "hi"}])])
    for name in (first, second):  # the client's key, as each keyless member takes it
        headers = {k.lower(): v for k, v in m[name].requests[0]["headers"].items()}
        assert headers["authorization"] == "Bearer client-key" and "x-api-key" not in headers
    if failure == "429":
        # held off: /readyz says so (once the attempt is recorded, when its upstream stream closes), for at
        # most max_eject_seconds, and the next request goes straight to the other member while it lasts
        first_name, seen = first.replace("_", "-"), []
        assert wait_until(lambda: seen.append(_readyz(m)) or seen[-1][first_name]["state"] == "held_off", timeout=3)
        assert 0 < seen[-1][first_name]["back_in_seconds"] <= 5
        assert seen[-1][second.replace("_", "-")] == {"name": second.replace("_", "-"), "state": "healthy"}
        m[second].script.append(Reply(text="the other while held"))
        said = "".join(b.text for b in client.messages.create(model=model, max_tokens=32, messages=msgs).content
                       if b.type == "text")
        assert said == "the other while held" and len(m[first].requests) == 1
        assert wait_until(lambda: _all_healthy(m), timeout=10)  # and back by itself: it serves again
        m[first].script.append(Reply(text="the first again"))
        assert "".join(b.text for b in client.messages.create(model=model, max_tokens=32, messages=msgs).content
                       if b.type == "text") == "the first again"


# The errors every backend would repeat, as real providers send them (status, body).
FINAL_ERRORS = {
    "401 the client's key": _openai_error(401, "Incorrect API key provided: client-key.", "invalid_request_error",
                                          "invalid_api_key"),
    "403 the client's key": _openai_error(403, "Project does not have access to model final-model",
                                          "invalid_request_error", "model_not_found"),
    "content policy (Azure, 400)": _openai_error(
        400, "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "invalid_request_error", "content_filter", "prompt"),
    "content policy (500)": _openai_error(500, "Request blocked: content_policy_violation", "server_error", None),
    "context length (vLLM, 400)": _vllm_error(400, "This model's maximum context length is 4096 tokens. However, "
                                                   "you requested 5000 tokens (4968 in the messages, 32 in the "
                                                   "completion). Please reduce the length of the messages or completion."),
    "context length (500)": _vllm_error(500, "The decoder prompt (length 9000) is longer than the maximum model "
                                             "length of 8192."),
}
# Anthropic's error type for each status, from its API reference (errors: HTTP errors)
ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  500: "api_error"}


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error", list(FINAL_ERRORS))
def test_an_error_every_member_would_repeat_is_not_failed_over(m, api, stream, error):
    """`final-model` is a-chat (keyless: the client's own key reaches it) then a-resp: a-chat's error is the
    answer, in the caller's API's shape; a-resp never sees the request."""
    status, body = FINAL_ERRORS[error]
    m["a_chat"].script.append(Reply(error=(status, body)))
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as e:
        if api == "messages":
            msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
            if stream:
                with m.anthropic().messages.stream(model="final-model", max_tokens=32, messages=msgs) as s:
                    s.get_final_message()
            else:
                m.anthropic().messages.create(model="final-model", max_tokens=32, messages=msgs)
        elif api == "chat":
            list(m.client().chat.completions.create(model="final-model", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)) if stream else \
                m.client().chat.completions.create(model="final-model", messages=[{"role": "user", "content": "hi"}])
        else:
            list(m.client().responses.create(model="final-model", input="hi", stream=True)) if stream else \
                m.client().responses.create(model="final-model", input="hi")
    assert e.value.status_code == status
    got = e.value.response.json()
    message = body["error"]["message"] if "error" in body else body["message"]
    if api == "chat":  # the client's API is the member's: its error as it sent it
        assert got == body
    elif api == "responses":  # translated: OpenAI's error object
        assert set(got) == {"error"} and got["error"]["message"] == message
        if "error" in body:
            assert got["error"]["code"] == body["error"]["code"] and got["error"]["type"] == body["error"]["type"]
    else:  # Anthropic's
        assert got == {"type": "error", "error": {"type": ANTHROPIC_TYPE[status], "message": message}}
    assert len(m["a_chat"].requests) == 1
    assert m["a_resp"].requests == []  # never failed over


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_the_same_member_failing_over_on_a_503_shows_the_group_is_live(m, api):
    """The control for the test above: the same request, the same member, a 503 instead: a-resp serves."""
    m["a_chat"].script.append(Reply(error=_vllm_error(503, "pool overloaded")))
    m["a_resp"].script.append(Reply(text="served by a-resp"))
    if api == "messages":
        out = m.anthropic().messages.create(model="final-model", max_tokens=32,
                                            messages=[{"role": "user", "content": "hi"}])
        text = "".join(b.text for b in out.content if b.type == "text")
    elif api == "chat":
        text = m.client().chat.completions.create(model="final-model", messages=[{"role": "user", "content": "hi"}]) \
            .choices[0].message.content or ""
    else:
        text = m.client().responses.create(model="final-model", input="hi").output_text
    assert text == "served by a-resp"
    assert len(m["a_chat"].requests) == 1 and len(m["a_resp"].requests) == 1


# -- /readyz: a member that keeps failing is out, and back -------------------------------------------

HEALTH = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{eject_after: 2, eject_seconds: 2, max_eject_seconds: 2, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: flaky
    api: chat
    models: ["flaky-model"]
    endpoints: ["{flaky}"]
  - name: steady
    api: responses
    models: ["flaky-model"]
    endpoints: ["{steady}"]
"""


@pytest.fixture(scope="module")
def health_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    servers: dict[str, ChatServer | ResponsesServer] = {"flaky": ChatServer(), "steady": ResponsesServer()}
    with _site(tmp_path_factory.mktemp("failover-readyz"), HEALTH, servers) as site:
        yield site


def test_readyz_shows_a_failing_member_out_and_back(health_site):
    site = health_site
    client = site.client()
    assert {n: b["state"] for n, b in _readyz(site).items()} == {"flaky": "healthy", "steady": "healthy"}
    site["flaky"].script.extend([Reply(error=_vllm_error(503, "warming up"))] * 2)
    for _ in range(2):  # eject_after: 2, each failed over to steady
        assert client.chat.completions.create(model="flaky-model", messages=[{"role": "user", "content": "hi"}]) \
            .choices[0].message.content == "echo: hi"
    assert len(site["flaky"].requests) == 2 and len(site["steady"].requests) == 2
    # each attempt is recorded once its upstream stream closes, which may be after the client's answer
    assert wait_until(lambda: _readyz(site)["flaky"]["state"] == "ejected", timeout=10)
    out = _readyz(site)
    assert out["steady"] == {"name": "steady", "state": "healthy"}
    if out["flaky"]["state"] == "ejected":  # (unless its two seconds ran out meanwhile)
        assert 0 < out["flaky"]["back_in_seconds"] <= 2
    # back by itself when its time is up, and it serves again
    assert wait_until(lambda: _readyz(site)["flaky"]["state"] == "healthy", timeout=10)
    assert _readyz(site)["flaky"] == {"name": "flaky", "state": "healthy"}
    site["flaky"].script.append(Reply(text="recovered"))
    assert wait_until(lambda: client.chat.completions.create(
        model="flaky-model", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "recovered",
        timeout=10)  # (Envoy's own ejection of it ends on its own clock)
    assert _readyz(site)["flaky"]["state"] == "healthy"


# -- conversations: a pinned instance gone, a held conversation moving to a Responses member ----------

STATE = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 50, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: held-chat
    api: chat
    models: ["held-model"]
    endpoints: ["{held_chat}"]
  - name: held-resp
    api: responses
    models: ["held-model"]
    endpoints: ["{held_resp}"]
  - name: pin-resp
    api: responses
    models: ["pin-model"]
    endpoints: ["{pin_resp}"]
  - name: pin-chat
    api: chat
    models: ["pin-model"]
    endpoints: ["{pin_chat}"]
  - name: two-resp
    api: responses
    models: ["two-model"]
    endpoints: [{two_endpoints}]
  - name: two-chat
    api: chat
    models: ["two-model"]
    endpoints: ["{two_chat}"]
{gone_backend}
  - name: gone-chat
    api: chat
    models: ["gone-model"]
    endpoints: ["{gone_chat}"]
  - name: gone-resp2
    api: responses
    models: ["gone-model"]
    endpoints: ["{gone_resp2}"]
  - name: keyed-resp
    api: responses
    models: ["keyed-model"]
    endpoints: ["{keyed_resp}"]
    api_key_env: KEYED_KEY
  - name: open-resp
    api: responses
    models: ["open-model"]
    endpoints: ["{open_resp}"]
  - name: open-chat
    api: chat
    models: ["open-model", "chat-first-model"]
    endpoints: ["{open_chat}"]
  - name: later-resp
    api: responses
    models: ["chat-first-model"]
    endpoints: ["{later_resp}"]
"""
GONE_BACKEND = """  - name: gone-resp
    api: responses
    models: ["gone-model"]
    endpoints: ["{gone_resp}"]"""
KEYED_KEY = "sk-keyed-responses-secret"


@pytest.fixture(scope="module")
def state_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    names = {"held_chat": ChatServer, "held_resp": ResponsesServer, "pin_resp": ResponsesServer, "pin_chat": ChatServer,
             "two_a": ResponsesServer, "two_b": ResponsesServer, "two_chat": ChatServer, "gone_chat": ChatServer,
             "gone_resp": ResponsesServer, "gone_resp2": ResponsesServer, "keyed_resp": ResponsesServer,
             "open_resp": ResponsesServer, "open_chat": ChatServer, "later_resp": ResponsesServer}
    servers: dict[str, ChatServer | ResponsesServer] = {name: cls() for name, cls in names.items()}
    two = f'"{servers["two_a"].address}", "{servers["two_b"].address}"'
    template = STATE.replace("{two_endpoints}", two).replace("{gone_backend}", GONE_BACKEND)
    with _site(tmp_path_factory.mktemp("failover-state"), template, servers, env={"KEYED_KEY": KEYED_KEY}) as site:
        yield site


@pytest.fixture
def st(state_site: Site) -> Site:
    state_site.reset()
    return state_site


def test_a_held_conversation_continues_on_a_responses_member_with_its_whole_history(st):
    """held-model: held-chat (chat-only: the sidecar holds the turns) then held-resp (Responses-only).
    Three turns on held-chat; it dies; the fourth turn's context reaches held-resp whole."""
    client, prev, said = st.client(), None, []
    for turn in range(1, 4):
        r = client.responses.create(model="held-model", input=f"turn {turn}", previous_response_id=prev)
        assert r.output_text == f"echo: turn {turn}"
        said += [("user", f"turn {turn}"), ("assistant", f"echo: turn {turn}")]
        prev = r.id
    assert len(st["held_chat"].requests) == 3 and st["held_resp"].requests == []
    st["held_chat"].close()  # the chat member dies: nothing listens there any more
    r = client.responses.create(model="held-model", input="turn 4", previous_response_id=prev)
    assert r.output_text == "echo: turn 4"
    (sent,) = st["held_resp"].requests
    assert sent["path"] == "/v1/responses" and "previous_response_id" not in sent["body"]  # it holds none of it
    assert [(i["role"], _text(i["content"])) for i in sent["body"]["input"]] == [*said, ("user", "turn 4")]
    # held-resp stored turn 4 (its input the whole history): the conversation is its own from there, and
    # goes on there with its own previous_response_id (held-chat could not continue it any more)
    fourth = r.id
    assert [(i["role"], _text(i["content"])) for i in st["held_resp"].stored[fourth]["input"]] == \
        [*said, ("user", "turn 4")]
    r = client.responses.create(model="held-model", input="turn 5", previous_response_id=fourth)
    assert r.output_text == "echo: turn 5"
    assert len(st["held_resp"].requests) == 2
    assert st["held_resp"].requests[-1]["body"] == {"model": "held-model", "input": "turn 5",
                                                    "previous_response_id": fourth}


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def test_a_pinned_instance_that_does_not_answer_is_a_503_and_nobody_else_is_asked(st):
    """pin-model: pin-resp (stateful Responses) then pin-chat. pin-resp stores turn 1 (the sidecar only
    pins it), then dies: only it could continue the conversation, so turn 2 is 503
    `pinned_backend_unavailable`, never sent to pin-chat with a context it does not have."""
    client = st.client()
    first = client.responses.create(model="pin-model", input="remember 7")
    assert first.id in st["pin_resp"].stored and st["pin_chat"].requests == []
    st["pin_resp"].close()
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(model="pin-model", input="what number?", previous_response_id=first.id)
    assert e.value.status_code == 503
    assert e.value.body["code"] == "pinned_backend_unavailable" and first.id in e.value.body["message"]
    assert st["pin_chat"].requests == []


def test_a_pinned_member_failing_is_its_own_answer_not_a_failover(st):
    """The pinned member answering 503 (overloaded) is not failed over either: no other member could
    rebuild the conversation. (`two-model`: two-resp, two instances, then two-chat.)"""
    client = st.client()
    first = client.responses.create(model="two-model", input="remember 7")
    holder = next(n for n in ("two_a", "two_b") if first.id in st[n].stored)
    st[holder].script.append(Reply(error=_openai_error(503, "The server is overloaded", "server_error", None)))
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(model="two-model", input="what number?", previous_response_id=first.id)
    assert e.value.status_code == 503 and e.value.body["message"] == "The server is overloaded"
    assert st["two_chat"].requests == [] and len(st[holder].requests) == 2
    other = "two_b" if holder == "two_a" else "two_a"
    assert st[other].requests == []


def test_a_pin_to_a_backend_outside_the_group_is_continued_there_alone(st):
    """A client that switches models mid-conversation: keyed-model's backend (keyed-resp, with its own
    key) stored turn 1; turn 2 names open-model (open-resp, open-chat), whose members cannot continue it.
    As for any pinned turn, it goes to the backend that holds it; neither member is asked, nor sees the
    holder's key."""
    client = st.client()
    first = client.responses.create(model="keyed-model", input="remember 7")
    assert first.id in st["keyed_resp"].stored
    second = client.responses.create(model="open-model", input="what number?", previous_response_id=first.id)
    assert second.output_text == "echo: what number?"
    assert st["open_resp"].requests == [] and st["open_chat"].requests == []
    last = st["keyed_resp"].requests[-1]
    assert last["body"]["previous_response_id"] == first.id
    assert last["headers"]["authorization"] == f"Bearer {KEYED_KEY}"


def test_a_pin_to_a_backend_outside_a_chat_first_group_is_a_400_and_nobody_is_asked(st):
    """The same switch of models to chat-first-model (open-chat, chat-only, first; later-resp): the model's
    backend cannot continue a response another backend stored, so the turn is the clear 400 that a model
    on a chat backend gets, naming both; no member is asked."""
    client = st.client()
    first = client.responses.create(model="keyed-model", input="remember 7")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="chat-first-model", input="what number?", previous_response_id=first.id)
    assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"
    assert "'keyed-resp'" in e.value.body["message"] and "'open-chat'" in e.value.body["message"]
    assert st["open_chat"].requests == [] and st["later_resp"].requests == [] and len(st["keyed_resp"].requests) == 1


@dataclass
class Reloaded:
    two_id: str  # stored by the two-resp instance the reload removed
    two_removed: str
    gone_id: str  # stored by gone-resp, which the reload removed


@pytest.fixture(scope="module")
def reloaded(state_site: Site) -> Reloaded:
    """Turn 1 of two conversations, then a config reload that removes their holders: the two-resp
    instance that stored one, and gone-resp (a Responses member failed over to) that stored the other."""
    site = state_site
    site.reset()
    client = site.client()
    two = client.responses.create(model="two-model", input="remember 7")
    removed = next(n for n in ("two_a", "two_b") if two.id in site[n].stored)
    kept = "two_b" if removed == "two_a" else "two_a"
    site["gone_chat"].script.append(Reply(error=_vllm_error(503, "pool overloaded")))
    gone = client.responses.create(model="gone-model", input="remember 8")
    assert gone.id in site["gone_resp"].stored
    template = STATE.replace("{two_endpoints}", f'"{site[kept].address}"').replace("{gone_backend}", "")
    site.config.write_text(template.format(**site.render))
    site.stack.procs[0].send_signal(signal.SIGHUP)
    assert wait_until(lambda: "gone-resp" not in _readyz(site), timeout=20)
    # Envoy has the new clusters too: the removed instance is no longer among two-model's hosts
    assert wait_until(lambda: site[removed].address not in _envoy_hosts(site, "group.two-resp.two-chat"), timeout=20)
    return Reloaded(two.id, removed, gone.id)


def _envoy_hosts(site: Site, cluster: str) -> str:
    with urllib.request.urlopen(site.envoy_admin + "/clusters", timeout=10) as r:
        return "\n".join(line for line in r.read().decode().splitlines() if line.startswith(cluster + "::"))


def test_a_pinned_instance_removed_from_the_config_is_a_409_and_nobody_else_is_asked(st, reloaded):
    client = st.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(model="two-model", input="what number?", previous_response_id=reloaded.two_id)
    assert e.value.status_code == 409 and e.value.body["code"] == "pinned_backend_gone"
    assert reloaded.two_id in e.value.body["message"]
    for name in ("two_a", "two_b", "two_chat"):
        assert st[name].requests == []


def test_a_pinned_backend_removed_from_the_config_is_a_409_whichever_member_is_first(st, reloaded):
    """gone-model is now gone-chat (chat-only, first) and gone-resp2: neither can continue what gone-resp
    stored, and the client is told that the backend holding it is gone."""
    client = st.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(model="gone-model", input="what number?", previous_response_id=reloaded.gone_id)
    assert e.value.status_code == 409 and e.value.body["code"] == "pinned_backend_gone"
    assert reloaded.gone_id in e.value.body["message"] and "gone-resp" in e.value.body["message"]
    assert st["gone_chat"].requests == [] and st["gone_resp2"].requests == []
