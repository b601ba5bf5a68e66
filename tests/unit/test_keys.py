"""Who may use the gateway's key (sans-IO): the paths it goes to, every form of it removed from answers
(split across chunks included), and the model names refused."""

from __future__ import annotations

import base64
import gzip
import json
import re
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import ConfigError, parse_config
from extproc.errors import GatewayError
from extproc.exchange import BUFFERED, STREAMED, Exchange
from extproc.ops.redact import REDACTED, KeyForms, StreamScrubber
from extproc.routing.gateway import Gateway
from extproc.routing.key_paths import key_allowed, key_paths
from extproc.routing.model_name import FAST_PATH_NAME, check_model_name

KEY = "sk-proj-AbC/def_123+xyz-0123456789"
CFG = """
backends:
  - name: keyed
    api: chat
    models: ["keyed-*"]
    endpoints: ["127.0.0.1:8001"]
    api_key_env: KEY
    key_paths: ["/v1/embeddings", "/v1/files/*"]
  - name: resp
    api: responses
    models: ["resp-*"]
    endpoints: ["127.0.0.1:8002"]
    api_key_env: KEY
  - name: open
    api: chat
    models: ["open-*"]
    endpoints: ["127.0.0.1:8003"]
  - name: anth
    api: messages
    models: ["claude-*"]
    endpoints: ["127.0.0.1:8004"]
    api_key_env: KEY
"""


@pytest.fixture(scope="module")
def gw() -> Gateway:
    return Gateway(parse_config(CFG, env={"KEY": KEY}))


def forms_written_by_others(key: str) -> list[bytes]:
    """The key as other software writes it: raw, JSON with every or some characters escaped, `\\/`,
    URL-encoded, base64 inside longer values at each alignment, both alphabets."""
    every = "".join(f"\\u{ord(c):04x}" for c in key)
    upper = "".join(f"\\u{ord(c):04X}" for c in key)
    some = "".join(f"\\u{ord(c):04x}" if i % 3 == 0 else c for i, c in enumerate(key))
    out = [key, every, upper, some, key.replace("/", "\\/"), quote(key, safe=""), re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(key, safe=""))]
    for prefix in ("", "u:", "us:"):
        out += [base64.b64encode((prefix + key).encode()).decode(), base64.urlsafe_b64encode((prefix + key).encode()).decode()]
    return [f.encode() for f in out]


@pytest.mark.parametrize("form", forms_written_by_others(KEY))
def test_every_form_of_the_key_is_removed(form):
    out = KeyForms(KEY).scrub(b'{"message": "bad key ' + form + b'!"}')
    assert REDACTED in out and not any(f in out for f in forms_written_by_others(KEY)[:7])
    assert out.startswith(b'{"message": "bad key ') and out.endswith(b'!"}')


def test_text_without_the_key_is_untouched():
    text = json.dumps({"choices": [{"message": {"content": "sk-proj-AbC/def and \\u0073k base64 c2st"}}]}).encode()
    assert KeyForms(KEY).scrub(text) == text


@pytest.mark.parametrize("form", forms_written_by_others(KEY)[:7])
def test_a_key_split_across_chunks_is_found_at_every_split(form):
    data = b'data: {"type": "error", "message": "key ' + form + b' rejected"}\n\n'
    expected = KeyForms(KEY).scrub(data)
    for cut in range(len(data) + 1):
        for cut2 in (cut, min(len(data), cut + 7)):
            s = StreamScrubber(KeyForms(KEY))
            out = s.feed(data[:cut], False) + s.feed(data[cut:cut2], False) + s.feed(data[cut2:], True)
            assert out == expected, (cut, cut2)


def test_a_stream_is_not_held_back_between_events():
    """An SSE event or a JSON document ends in bytes no form of the key holds: nothing waits for the
    next chunk."""
    s = StreamScrubber(KeyForms(KEY))
    event = b'data: {"choices": [{"delta": {"content": "abc"}}]}\n\n'
    assert s.feed(event, False) == event
    assert s.feed(b'{"id": 1}', False) == b'{"id": 1}'


def test_response_headers_carrying_the_key_are_rewritten():
    headers = {":status": "302", "location": f"https://x.example/cb?key={quote(KEY, safe='')}",
               "www-authenticate": f'Bearer error="invalid_token", token="{KEY}"', "content-type": "application/json"}
    assert dict(KeyForms(KEY).headers(headers)) == {"location": "https://x.example/cb?key=[redacted]",
                                                    "www-authenticate": 'Bearer error="invalid_token", token="[redacted]"'}


# -- key paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "path", "allowed"), [
    ("keyed", "/v1/chat/completions", True), ("keyed", "/v1/chat/completions?x=1", True),
    ("keyed", "/v1/models", True), ("keyed", "/v1/embeddings", True), ("keyed", "/v1/files/file-1/content", True),
    ("keyed", "/v1/files", False), ("keyed", "/v1/filesystem", False), ("keyed", "/v1/responses", False),
    ("keyed", "/v1/chat/completions/chatcmpl-1", False), ("keyed", "/v1/models/keyed-a", False),
    ("keyed", "/v1/organization/users", False), ("keyed", "/anything", False),
    ("resp", "/v1/responses", True), ("resp", "/v1/responses/resp_1/input_items", True),
    ("resp", "/v1/responses/compact", True), ("resp", "/v1/chat/completions", False), ("resp", "/v1/embeddings", False),
    ("open", "/v1/organization/users", True),  # no key of the gateway's: the client's own credential goes
    ("resp", "/v1/messages", False), ("keyed", "/v1/messages", False),  # a Messages backend's paths are its own
    ("anth", "/v1/messages", True), ("anth", "/v1/messages?beta=true", True), ("anth", "/v1/messages/count_tokens", True),
    ("anth", "/v1/chat/completions", False), ("anth", "/v1/responses", False), ("anth", "/v1/messages/batches", True),
    ("anth", "/v1/messagesx", False), ("anth", "/v1/files/f-1", False),
])
def test_which_paths_get_the_key(gw, backend, path, allowed):
    assert key_allowed(gw.config.backend(backend), path) is allowed


def test_key_paths_are_listed_for_resolve(gw):
    assert key_paths(gw.config.backend("keyed")) == ("/v1/chat/completions", "/v1/models", "/v1/embeddings",
                                                     "/v1/files/*")


@pytest.mark.parametrize("entry", ["v1/embeddings", "/v1/../admin", "/v1/files*", "/v1//x", "/v1/a%2Fb", "/"])
def test_a_key_path_that_is_not_a_normalised_path_is_a_config_error(entry):
    with pytest.raises(ConfigError, match="key_paths"):
        parse_config(CFG.replace('"/v1/embeddings"', json.dumps(entry)), env={"KEY": KEY})


def request(gw: Gateway, method: str, path: str, body: dict | None = None):
    ex = Exchange(gw)
    headers = {":method": method, ":path": path, **({"content-type": "application/json"} if body else {})}
    act = ex.request_headers(headers, body is None)
    if body is not None:
        act = ex.request_body(json.dumps(body).encode())
    return ex, act


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/files", None), ("GET", "/v1/organization/users", None), ("GET", "/v1/models/keyed-a", None),
    ("POST", "/v1/images/generations", {"model": "keyed-a", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "resp-a", "input": "x"}),
])
def test_other_paths_to_a_keyed_backend_are_a_404(gw, method, path, body):
    with pytest.raises(GatewayError) as e:
        request(gw, method, path, body)
    assert (e.value.status, e.value.code, e.value.message) == (404, "invalid_url", f"Invalid URL ({method} {path})")


def test_a_keyed_request_asks_for_an_answer_it_can_read(gw):
    _, act = request(gw, "POST", "/v1/embeddings", {"model": "keyed-a", "input": "x"})
    assert dict(act.set_headers)["authorization"] == "Bearer " + KEY
    assert ("accept-encoding", "identity") in act.set_headers


# -- the answer of a keyed exchange ---------------------------------------------------------------

def test_a_passed_through_answer_is_streamed_to_its_end_and_scrubbed(gw):
    ex, _ = request(gw, "POST", "/v1/embeddings", {"model": "keyed-a", "input": "x"})
    act = ex.response_headers({":status": "200", "content-type": "application/json", "content-length": "99",
                               "x-echo": "Bearer " + KEY})
    assert act.response_body_mode == STREAMED and not act.done and "content-length" in act.remove_headers
    assert ("x-echo", "Bearer [redacted]") in act.set_headers
    first = ex.response_body(b'{"echo": "' + KEY[:10].encode(), False)
    assert first.body == b'{"echo": "' and not first.done  # the start of the key waits for the rest
    last = ex.response_body(KEY[10:].encode() + b'"}', True)
    assert last.body == b'[redacted]"}' and last.done


def test_a_compressed_pass_through_answer_is_decoded_and_scrubbed(gw):
    ex, _ = request(gw, "POST", "/v1/embeddings", {"model": "keyed-a", "input": "x"})
    act = ex.response_headers({":status": "200", "content-type": "application/json", "content-encoding": "gzip"})
    assert "content-encoding" in act.remove_headers
    assert ex.response_body(gzip.compress(b'{"k": "' + KEY.encode() + b'"}'), True).body == b'{"k": "[redacted]"}'


def test_an_unreadable_encoding_is_withheld(gw):
    ex, _ = request(gw, "POST", "/v1/embeddings", {"model": "keyed-a", "input": "x"})
    with pytest.raises(GatewayError) as e:
        ex.response_headers({":status": "200", "content-type": "application/json", "content-encoding": "br"})
    assert (e.value.status, e.value.code) == (502, "upstream_error_withheld")


def test_a_buffered_error_keeps_a_true_content_length(gw):
    ex, _ = request(gw, "POST", "/v1/chat/completions", {"model": "keyed-a", "messages": [{"role": "user", "content": "x"}]})
    assert ex.response_headers({":status": "401", "content-type": "application/json"}).response_body_mode == BUFFERED
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    act = ex.response_body(b'{"error": {"message": "bad key ' + escaped.encode() + b'"}}', True)
    assert act.body == b'{"error": {"message": "bad key [redacted]"}}'
    assert dict(act.set_headers)["content-length"] == str(len(act.body))


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_untranslated_error_is_scrubbed_once_as_it_goes_out(gw, monkeypatch, encoding):
    """The error's handler only reads it (decoded); the key guard alone removes the key, in one pass."""
    passes: list[str] = []
    scrub, feed = KeyForms.scrub, StreamScrubber.feed
    monkeypatch.setattr(KeyForms, "scrub", lambda self, data: passes.append("scrub") or scrub(self, data))
    monkeypatch.setattr(StreamScrubber, "feed", lambda self, chunk, end: passes.append("feed") or feed(self, chunk, end))
    ex, _ = request(gw, "POST", "/v1/chat/completions", {"model": "keyed-a", "messages": [{"role": "user", "content": "x"}]})
    ex.response_headers({":status": "401", "content-type": "application/json", "content-encoding": encoding})
    doc = b'{"error": {"message": "bad key ' + KEY.encode() + b'"}}'
    act = ex.response_body(gzip.compress(doc) if encoding == "gzip" else doc, True)
    assert act.body == b'{"error": {"message": "bad key [redacted]"}}' and act.done
    assert ("content-encoding" in act.remove_headers) is (encoding == "gzip")
    assert passes == ["feed"]


def test_a_messages_backends_key_goes_as_x_api_key_and_is_never_reflected(gw):
    """The key moves to Anthropic's header, the client's bearer token is removed, and the answer (an
    Anthropic error quoting the key, a header echoing it) comes back without it, in Anthropic's shape."""
    ex, act = request(gw, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "x"}]})
    sent = dict(act.set_headers)
    assert sent["x-api-key"] == KEY and "authorization" not in sent and "authorization" in act.remove_headers
    assert ("accept-encoding", "identity") in act.set_headers
    head = ex.response_headers({":status": "401", "content-type": "application/json", "x-echo": KEY})
    assert ("x-echo", "[redacted]") in head.set_headers
    body = ex.response_body(b'{"type": "error", "error": {"type": "authentication_error", "message": "bad ' +
                            KEY.encode() + b'"}}', True).body
    assert body == b'{"type": "error", "error": {"type": "authentication_error", "message": "bad [redacted]"}}'


def test_a_backend_without_a_key_is_left_alone(gw):
    _, act = request(gw, "POST", "/v1/embeddings", {"model": "open-a", "input": "x"})
    assert act.done and "authorization" not in dict(act.set_headers)  # its answer is Envoy's to pass on


# -- model names ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "ok"), [
    ("gpt-5", True), ("a" * 256, True), ("é" * 128, True), ("a" * 257, False), ("é" * 129, False),
    ("a\x00", False), ("a\nb", False), ("a\rb", False), ("a\tb", False), ("a\x7f", False), ("a\u0085", False),
    ("a\u2028b", True),  # a line separator is no control character; the logs escape it
])
def test_model_names(model, ok):
    if ok:
        check_model_name(model)
    else:
        with pytest.raises(GatewayError) as e:
            check_model_name(model)
        assert (e.value.status, e.value.param) == (400, "model")


def test_the_fast_path_matches_only_names_the_processor_accepts():
    """RE2's full match, emulated with Python's: whatever it matches, the processor accepts too."""
    fast = re.compile(f"(?:{FAST_PATH_NAME})")
    for model in ("gpt-5", "a" * 256, "é" * 64, "a" * 257, "é" * 65, "a\nb", "a\x00", "", "a\u0085"):
        if fast.fullmatch(model):
            check_model_name(model)
    assert fast.fullmatch("a" * 256) and fast.fullmatch("é" * 64) and not fast.fullmatch("a\nb")


def test_the_processor_refuses_an_odd_name_before_routing(gw):
    with pytest.raises(GatewayError) as e:
        request(gw, "POST", "/v1/chat/completions", {"model": "open-a\nINFO forged", "messages": []})
    assert (e.value.status, e.value.param) == (400, "model")


def test_resolve_says_which_paths_get_the_key(tmp_path, monkeypatch, capsys):
    from extproc.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(CFG)
    monkeypatch.setenv("KEY", KEY)
    assert main(["resolve", "--config", str(cfg), "keyed-a"]) == 0
    assert ("key:      KEY, sent only on /v1/chat/completions, /v1/models, /v1/embeddings, /v1/files/* "
            "(any other path to this backend: 404)") in capsys.readouterr().out.splitlines()
    assert main(["resolve", "--config", str(cfg), "open-a"]) == 0
    assert "key:      none of the gateway's: the client's own credential goes, on any path" in capsys.readouterr().out


@given(st.lists(st.one_of(st.text(max_size=20).map(str.encode), st.sampled_from(forms_written_by_others(KEY))),
                max_size=8),
       st.lists(st.integers(min_value=0, max_value=400), max_size=6))
@settings(max_examples=300, deadline=None)
def test_any_chunking_of_any_mix_gives_the_whole_bodys_scrub(parts, cuts):
    """Whatever the text around the key and wherever the chunks end: the streamed result is the whole
    body scrubbed at once, and no raw or escaped key survives."""
    data = b"".join(parts)
    s = StreamScrubber(KeyForms(KEY))
    bounds = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    out = b"".join(s.feed(p, False) for p in pieces) + s.feed(b"", True)
    assert out == KeyForms(KEY).scrub(data)
    assert not any(f in out for f in forms_written_by_others(KEY)[:7])
