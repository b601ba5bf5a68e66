"""End to end: each connection-local rule of the Open Responses spec's WebSocket Transport (and what
follows it: continuation, compaction, errors), one test per rule, through the real Envoy and sidecar
against a chat-only backend. The 60-minute limit has its own file (tests/test_e2e_websocket_limit.py:
it needs a short limit); the spec's example envelopes are checked against its `WebSocketErrorEvent`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event

import openai
import pytest
from websockets.sync.client import connect

from extproc.local.stack import Stack, free_port, wait_for_port
from extproc.translate.compact import SUMMARY_INTRO, SUMMARY_REQUEST

from .conformance import check_stream, validate
from .test_e2e_surface import text_of, ws_turn
from .upstreams import ChatServer, Reply

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: off
websocket_listen: 127.0.0.1:{ws}
websocket_gateway: http://127.0.0.1:{listen}
backends:
  - {{name: chat, api: chat, models: ["llama-*"], endpoints: ["{chat}"]}}
"""


@dataclass
class Sockets:
    url: str
    ws_url: str
    chat: ChatServer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)

    def sent(self) -> list[list]:
        """The chat backend's messages, request by request, as (role, content) pairs."""
        return [[(m["role"], m["content"]) for m in r["body"]["messages"]] for r in self.chat.requests]


@pytest.fixture(scope="module")
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sockets]:
    chat = ChatServer()
    port, ws, listen = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("wsrules")) / "config.yaml"
    cfg.write_text(CONFIG.format(port=port, ws=ws, listen=listen, chat=chat.address))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(port, proc=sidecar)
        wait_for_port(ws, proc=sidecar)
        stack.start_envoy(listen, free_port(), port, websocket_port=ws)
        yield Sockets(f"http://127.0.0.1:{listen}", f"ws://127.0.0.1:{listen}/v1/responses", chat)
    finally:
        stack.stop()
        chat.close()


@pytest.fixture
def sk(sockets: Sockets) -> Sockets:
    sockets.chat.reset()
    return sockets


def create(**fields) -> str:
    return json.dumps({"type": "response.create", "model": "llama-3", **fields})


def turn(ws, **fields) -> list[dict]:
    """One turn of the chat model (unless `model` says otherwise): its events up to the terminal one."""
    return ws_turn(ws, **{"model": "llama-3", **fields})


def test_ws_rule_one_in_flight_response_per_connection_processed_sequentially(sk):
    """Two response.create messages sent at once: the second is processed only after the first ended,
    its events never interleaved with the first's."""
    release = Event()
    sk.chat.script.extend([Reply(text="first answer", hold=release), Reply(text="second answer")])
    with connect(sk.ws_url) as ws:
        ws.send(create(input="one"))
        ws.send(create(input="two"))
        deadline = time.monotonic() + 30
        while not sk.chat.requests and time.monotonic() < deadline:  # the first is in flight, held
            time.sleep(0.01)
        assert len(sk.chat.requests) == 1  # the second waits for it, queued on the socket
        release.set()
        events = []
        while sum(e["type"] == "response.completed" for e in events) < 2:
            events.append(json.loads(ws.recv(timeout=30)))
    end = next(i for i, e in enumerate(events) if e["type"] == "response.completed")
    first, second = events[:end + 1], events[end + 1:]
    for turn in (first, second):
        check_stream(turn)
    assert (text_of(first), text_of(second)) == ("first answer", "second answer")
    assert first[0]["response"]["id"] != second[0]["response"]["id"]
    assert [m[-1] for m in sk.sent()] == [("user", "one"), ("user", "two")]


def test_ws_rule_most_recent_response_cached_for_store_false_continuation(sk):
    """A store: false response continues on its socket from connection-local state only: the chat
    model gets the whole conversation, and nothing was persisted (HTTP cannot find it)."""
    sk.chat.script.extend([Reply(text="uno"), Reply(text="dos")])
    with connect(sk.ws_url) as ws:
        r1 = turn(ws, input="one", store=False)[-1]["response"]
        r2 = turn(ws, input="two", store=False, previous_response_id=r1["id"])[-1]["response"]
    assert r2["status"] == "completed" and r2["previous_response_id"] == r1["id"]
    assert sk.sent()[1] == [("user", "one"), ("assistant", "uno"), ("user", "two")]
    with pytest.raises(openai.NotFoundError):
        sk.client().responses.retrieve(r1["id"])


def test_ws_rule_unstored_response_not_cached_is_previous_response_not_found(sk):
    """Only the most recent response is cached: an older store: false one, or one of another socket,
    has no persisted fallback and fails with previous_response_not_found."""
    sk.chat.script.extend([Reply(text="uno"), Reply(text="dos")])
    with connect(sk.ws_url) as ws:
        r1 = turn(ws, input="one", store=False)[-1]["response"]
        turn(ws, input="two", store=False)
        (older,) = turn(ws, input="three", store=False, previous_response_id=r1["id"])
    assert len(sk.chat.requests) == 2  # answered by the socket itself
    with connect(sk.ws_url) as other:
        (elsewhere,) = turn(other, input="three", store=False, previous_response_id=r1["id"])
    for ev in (older, elsewhere):
        validate("WebSocketErrorEvent", ev)
        assert ev["error"]["code"] == "previous_response_not_found"
        assert ev["error"]["param"] == "previous_response_id" and ev["status"] in (400, 404)
    assert len(sk.chat.requests) == 2


@pytest.mark.parametrize("failure", ["upstream 400", "upstream 500", "refused by the socket",
                                     "a tool output without its call"])
def test_ws_rule_failed_continuation_evicts_the_referenced_response(sk, failure):
    """A continuation that fails with a 4xx or 5xx evicts the response it referenced: continuing it
    again is previous_response_not_found, and a fresh turn works. The last case is the Open Responses
    suite's own (websocket-failed-continuation-evicts-cache): a function_call_output whose call the
    continued response never made, refused by the gateway before any upstream."""
    sk.chat.script.append(Reply(text="uno"))
    if failure.startswith("upstream"):
        status = int(failure.split()[1])
        sk.chat.script.append(Reply(error=(status, {"error": {"message": "refused", "type": "invalid_request_error"}})))
    sk.chat.script.append(Reply(text="fresh"))
    with connect(sk.ws_url) as ws:
        r1 = turn(ws, input="one", store=False)[-1]["response"]
        bad = {"refused by the socket": {"stream": False},
               "a tool output without its call": {"input": [{"type": "function_call_output", "call_id": "call_none",
                                                             "output": "no such call"}]}}.get(failure, {})
        (failed,) = turn(ws, **{"input": "two", **bad}, store=False, previous_response_id=r1["id"])
        sent = len(sk.chat.requests)
        (again,) = turn(ws, input="two", store=False, previous_response_id=r1["id"])
        fresh = turn(ws, input="start over", store=False)
    validate("WebSocketErrorEvent", failed)
    assert failed["status"] == {"upstream 400": 400, "upstream 500": 500}.get(failure, 400)
    assert (again["status"], again["error"]["code"]) == (400, "previous_response_not_found")
    assert text_of(fresh) == "fresh"
    assert len(sk.chat.requests) == sent + 1  # the retry was answered by the socket itself
    assert sent == (2 if failure.startswith("upstream") else 1)  # the others never reached the upstream


def test_ws_rule_store_true_hydrates_older_ids_from_persisted_state(sk):
    """A stored response is continued from the gateway's state when the socket no longer caches it,
    on the same socket after newer turns and on a new socket."""
    sk.chat.script.extend([Reply(text="uno"), Reply(text="aside"), Reply(text="tres"), Reply(text="cuatro")])
    with connect(sk.ws_url) as ws:
        r1 = turn(ws, input="one")[-1]["response"]
        turn(ws, input="unrelated", store=False)
        r3 = turn(ws, input="three", previous_response_id=r1["id"])[-1]["response"]
    with connect(sk.ws_url) as fresh:
        r4 = turn(fresh, input="four", previous_response_id=r3["id"])[-1]["response"]
    assert r4["status"] == "completed"
    assert sk.sent()[2] == [("user", "one"), ("assistant", "uno"), ("user", "three")]
    assert sk.sent()[3] == [("user", "one"), ("assistant", "uno"), ("user", "three"), ("assistant", "tres"),
                            ("user", "four")]


@pytest.mark.parametrize("field", [{"stream": False}, {"stream_options": {"include_usage": True}},
                                   {"background": True}, {"background": False}])
def test_ws_rule_http_transport_fields_are_not_sent_on_websocket_requests(sk, field):
    """stream, stream_options and background MUST NOT be sent: refused (400 naming the field), the
    socket lives on. `stream: true`, which Codex CLI sends, is tolerated: a socket's turns stream."""
    sk.chat.script.extend([Reply(text="codex style"), Reply(text="after")])
    with connect(sk.ws_url) as ws:
        (refused,) = turn(ws, input="x", **field)
        tolerated = turn(ws, input="y", stream=True)
        after = turn(ws, input="z")
    validate("WebSocketErrorEvent", refused)
    assert (refused["status"], refused["error"]["code"]) == (400, "unsupported_parameter")
    assert refused["error"]["param"] == next(iter(field))
    assert (text_of(tolerated), text_of(after)) == ("codex style", "after")
    assert len(sk.chat.requests) == 2


def test_ws_rule_failures_are_a_json_error_envelope_with_status_and_code(sk):
    """Every failure, the socket's own or the upstream's, is {"type": "error", "status", "error": {code,
    message}}; the socket stays open for the next turn."""
    sk.chat.script.extend([Reply(error=(429, {"error": {"message": "slow down", "type": "rate_limit_error"}})),
                           Reply(text="still open")])
    with connect(sk.ws_url) as ws:
        ws.send("{not json")
        bad_json = json.loads(ws.recv(timeout=30))
        (limited,) = turn(ws, input="x")
        (unknown,) = turn(ws, model="gpt-unknown", input="x")
        ok = turn(ws, input="y")
    for ev, status, code in ((bad_json, 400, "invalid_json"), (limited, 429, "rate_limit_error"),
                             (unknown, 404, "model_not_found")):
        validate("WebSocketErrorEvent", ev)
        assert (ev["type"], ev["status"], ev["error"]["code"]) == ("error", status, code)
        assert isinstance(ev["error"]["message"], str) and ev["error"]["message"]
    assert text_of(ok) == "still open"


def test_ws_rule_standalone_compaction_window_starts_a_new_response(sk):
    """After /responses/compact the client starts a new response on the socket with the compacted
    window as its base input (no previous_response_id): the chat model gets the summary in its place."""
    sk.chat.script.extend([Reply(text="Zed asked to remember his name."), Reply(text="You are Zed.")])
    window = sk.client().responses.with_raw_response.compact(
        model="llama-3", input=[{"role": "user", "content": "I am Zed"}, {"role": "assistant", "content": "Hi Zed"}])
    items = json.loads(window.text)["output"]
    with connect(sk.ws_url, additional_headers={"authorization": "Bearer client-key"}) as ws:  # the same tenant
        events = turn(ws, input=[*items, {"role": "user", "content": "who am I?"}], store=False)
    check_stream(events)
    assert text_of(events) == "You are Zed."
    assert sk.sent()[1] == [("user", "I am Zed"), ("user", SUMMARY_INTRO + "Zed asked to remember his name."),
                            ("user", "who am I?")]


def test_ws_rule_compaction_trigger_on_a_socket_continues_from_the_compacted_window(sk):
    """A compaction_trigger turn over the socket (Codex's way) answers one sealed compaction item; the
    store: false continuation from it sends the compacted window: user messages, summary, new input."""
    sk.chat.script.extend([Reply(text="Zed's name is Zed."), Reply(text="You are Zed.")])
    with connect(sk.ws_url) as ws:
        compaction = turn(ws, store=False, input=[{"role": "user", "content": "I am Zed"},
                                                     {"role": "assistant", "content": "Hi Zed"},
                                                     {"type": "compaction_trigger"}])
        rid = compaction[-1]["response"]["id"]
        after = turn(ws, input="who am I?", store=False, previous_response_id=rid)
    check_stream(compaction)
    (item,) = compaction[-1]["response"]["output"]
    assert item["type"] == "compaction"
    assert sk.sent()[0][-1] == ("user", SUMMARY_REQUEST)
    assert text_of(after) == "You are Zed."
    assert sk.sent()[1] == [("user", "I am Zed"), ("user", SUMMARY_INTRO + "Zed's name is Zed."), ("user", "who am I?")]


def test_ws_a_closed_socket_is_closed_promptly(sk):
    """The client's close is answered and the TCP connection ends well within the client's own
    close_timeout: RFC 6455 7.1.1 has the client wait for the server's FIN, and Envoy, having closed
    its side, waits for the client's only its delayed_close_timeout (deploy/envoy.yaml)."""
    with connect(sk.ws_url, close_timeout=10) as ws:
        turn(ws, input="hi")
        started = time.monotonic()
        ws.close()
        took = time.monotonic() - started
    assert ws.close_code == 1000 and took < 5, (ws.close_code, took)
