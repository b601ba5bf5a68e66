"""Config validation (every problem, with its line) and model classification."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.config import ConfigError, Endpoint, parse_config
from extproc.routing.classify import Classifier

GOOD = """
backends:
  - name: vllm
    api: chat
    models: ["llama-*", "qwen3"]
    endpoints: ["127.0.0.1:8001", {address: "localhost:8002", weight: 2}]
    api_key_env: KEY
  - name: openai
    api: both
    models: ["gpt-*", "o*", "*codex*"]
    cluster: openai
    path_prefix: /openai
model_rules:
  - match: "gpt-4.1*"
    mode: chat
  - match: "qwen3"
    translate: false
"""


def test_good_config():
    cfg = parse_config(GOOD, env={"KEY": "sk-1"})
    vllm, openai = cfg.backends
    assert [e.address for e in vllm.endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert vllm.endpoints[1].weight == 2 and vllm.api_key == "sk-1"
    assert "sk-1" not in repr(vllm)  # the key never shows in logs
    assert openai.cluster == "openai" and openai.path_prefix == "/openai"


def test_every_problem_reported_with_its_line():
    bad = """
backends:
  - name: "bad name!"
    api: chatty
    models: []
    endpoints: ["nohost", "127.0.0.1:99999"]
    cluster: also
    api_key_env: MISSING_VAR
    surprise: 1
  - name: b2
    api: chat
model_rules:
  - match: x
    mode: sometimes
"""
    with pytest.raises(ConfigError) as e:
        parse_config(bad, source="cfg.yaml", env={})
    text = "\n".join(e.value.problems)
    for expected in ["cfg.yaml:3: backends[0].name", "cfg.yaml:4: backends[0].api: must be one of",
                     "cfg.yaml:5: backends[0].models", "backends[0].endpoints[0]", "backends[0].endpoints[1]",
                     "give exactly one of 'endpoints'",
                     "cfg.yaml:9: backends[0].surprise: unknown key", "backends[1].models: required",
                     "cfg.yaml:14: model_rules[0].mode"]:
        assert expected in text, (expected, text)


@pytest.mark.parametrize("text", ["", "backends: []", "backends: [", "- a list"])
def test_hopeless_configs(text):
    with pytest.raises(ConfigError):
        parse_config(text, env={})


@pytest.mark.parametrize(("model", "backend", "mode", "source"), [
    ("llama-3", "vllm", "chat", "backend vllm api"),
    ("gpt-4o", "openai", "both", "backend openai api"),
    ("gpt-5.3-codex", "openai", "responses", "built-in catalogue '*codex*'"),
    ("o3-pro", "openai", "responses", "built-in catalogue 'o3-pro*'"),
    ("gpt-4.1-mini", "openai", "chat", "model_rules[0] 'gpt-4.1*'"),
    ("qwen3", "vllm", "chat", "backend vllm api"),
])
def test_resolution(model, backend, mode, source):
    res = Classifier(parse_config(GOOD, env={"KEY": "k"})).resolve(model)
    assert (res.backend.name, res.mode, res.source) == (backend, mode, source)


def test_unknown_model_and_translate_switch():
    c = Classifier(parse_config(GOOD, env={"KEY": "k"}))
    assert c.resolve("mistral") is None
    qwen = c.resolve("qwen3")
    assert qwen.upstream_api("chat") == "chat" and qwen.upstream_api("responses") is None
    codex = c.resolve("gpt-5.3-codex")
    assert codex.upstream_api("chat") == "responses" and codex.upstream_api("responses") == "responses"
    assert c.resolve("gpt-4o").upstream_api("chat") == "chat"


def test_state_section():
    cfg = parse_config(GOOD + "state: {store: redis, redis_url: 'redis://r:6379/1', ttl_seconds: 3600}\n",
                       env={"KEY": "k"})
    assert (cfg.state.store, cfg.state.redis_url, cfg.state.ttl_seconds) == ("redis", "redis://r:6379/1", 3600)
    assert parse_config(GOOD, env={"KEY": "k"}).state.store == "memory"
    with pytest.raises(ConfigError) as e:
        parse_config(GOOD + "state: {store: redis, timeout_ms: 0, color: red}\n", env={"KEY": "k"})
    text = str(e.value)
    assert "state.redis_url: required" in text and "state.timeout_ms" in text and "state.color" in text
    with pytest.raises(ConfigError) as e:
        parse_config(GOOD + "state: {store: sqlite}\n", env={"KEY": "k"})
    assert "state.sqlite_path" in str(e.value)


def test_dns_endpoints_expand_and_are_remembered():
    cfg = parse_config("""
backends:
  - {name: a, api: chat, models: [x], endpoints: [{dns: "localhost:8000"}, "127.0.0.9:1"]}
""", env={})
    (b,) = cfg.backends
    assert b.dns_names == ("localhost:8000",) and "127.0.0.1:8000" in [e.address for e in b.endpoints]


def test_dns_entries_are_resolved_again_without_reading_the_file():
    cfg = parse_config("""
backends:
  - name: b
    api: chat
    models: ["m"]
    endpoints: ["10.1.2.3:80", {dns: "localhost:8000", weight: 3}]
""", env={})
    b = cfg.backends[0]
    assert b.dns_names == ("localhost:8000",) and b.dns_weights == (3,)
    again = b.resolve_dns()
    assert again is not None and again[0] == Endpoint("10.1.2.3:80", 1)
    assert "127.0.0.1:8000" in {e.address for e in again[1:]} and {e.weight for e in again[1:]} == {3}
    gone = dataclasses.replace(b, dns_names=("no-such-host.invalid:80",), dns_weights=(1,))
    assert gone.resolve_dns() is None  # a failed lookup keeps the last known endpoints


def test_redis_password_comes_from_the_environment_only(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not parsed at load")
    state = f"state: {{store: redis, redis_url: 'rediss://gw@r:6380/0', redis_password_env: RPW, redis_ca_file: '{ca}'}}\n"
    cfg = parse_config(GOOD + state, env={"KEY": "k", "RPW": "hunter2"})
    assert (cfg.state.redis_password, cfg.state.redis_ca_file) == ("hunter2", str(ca))
    assert "hunter2" not in repr(cfg)
    bad = {
        "state: {store: redis, redis_url: 'redis://:hunter2@r:6379/0'}": "state.redis_url: holds a password",
        "state: {store: redis, redis_url: 'redis://r', redis_password_env: RPW}": "environment variable RPW is not set",
        "state: {store: redis, redis_url: 'redis://r', redis_password_env: 'not a name'}": "environment variable name",
        f"state: {{store: redis, redis_url: 'redis://r', redis_ca_file: '{ca}'}}": "only used with a rediss://",
        "state: {store: redis, redis_url: 'rediss://r', redis_ca_file: /nonexistent.crt}": "no such file",
        "state: {store: redis, redis_url: 'rediss://r/0?ssl_cert_reqs=none'}": "TLS options in the URL",
    }
    for text, problem in bad.items():
        with pytest.raises(ConfigError) as e:
            parse_config(GOOD + text + "\n", env={"KEY": "k"})
        assert problem in str(e.value) and "hunter2" not in str(e.value), text


def test_the_background_event_log_limits():
    cfg = parse_config(GOOD + "limits: {background_max_events: 500, background_max_event_bytes: 65536}\n",
                       env={"KEY": "k"})
    assert (cfg.limits.background_max_events, cfg.limits.background_max_event_bytes) == (500, 65536)
    default = parse_config(GOOD, env={"KEY": "k"}).limits
    assert (default.background_max_events, default.background_max_event_bytes) == (50_000, 16 * 1024 * 1024)
    with pytest.raises(ConfigError) as e:
        parse_config(GOOD + "limits: {background_max_events: 5, background_max_event_bytes: 100}\n", env={"KEY": "k"})
    assert "limits.background_max_events" in str(e.value) and "limits.background_max_event_bytes" in str(e.value)


def test_the_background_lease():
    assert parse_config(GOOD, env={"KEY": "k"}).limits.background_lease_seconds == 15
    cfg = parse_config(GOOD + "limits: {background_lease_seconds: 60}\n", env={"KEY": "k"})
    assert cfg.limits.background_lease_seconds == 60
    for bad in (2, 601):
        with pytest.raises(ConfigError, match=r"limits\.background_lease_seconds: must be between 3 and 600"):
            parse_config(GOOD + f"limits: {{background_lease_seconds: {bad}}}\n", env={"KEY": "k"})
