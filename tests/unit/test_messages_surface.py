"""Anthropic Messages beside the rest of the surface, sans-IO: classification by an upstream's /v1/models,
the sidecar's /v1/models listing the mode, `extproc resolve` naming each client's pair, and the GenAI
metrics of a Messages exchange (its provider, its usage counted as OpenAI counts it)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from extproc.cli import main
from extproc.config import parse_config
from extproc.exchange import Exchange
from extproc.ops.metrics import Metrics
from extproc.ops.record import record
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge, parse_models

CONFIG = """
backends:
  - {name: claude, api: messages, models: ["claude-opus-4", "claude-*"], endpoints: ["127.0.0.1:9"]}
  - {name: chat, api: chat, models: ["llama-3"], endpoints: ["127.0.0.1:9"]}
  - {name: mixed, api: auto, models: ["claude-sonnet-4-5", "mix-*"], endpoints: ["127.0.0.1:9"]}
"""


def test_an_upstream_models_list_can_say_a_model_answers_on_messages():
    """LiteLLM's `supported_endpoints` and a `mode` field, in the shapes parse_models already reads; a
    model listed on both families is an OpenAI one; Anthropic's own list (`type: model`) says nothing."""
    got = parse_models({"data": [
        {"id": "mix-a", "supported_endpoints": ["/v1/messages"]},
        {"id": "mix-b", "mode": "messages"},
        {"id": "mix-c", "supported_endpoints": ["/v1/chat/completions", "/v1/messages"]},
        {"id": "claude-haiku-4-5", "type": "model", "display_name": "Claude Haiku 4.5"}]})
    assert got == {"mix-a": "messages", "mix-b": "messages", "mix-c": "chat", "claude-haiku-4-5": None}


def test_the_models_list_names_the_messages_mode_from_config_catalogue_and_discovery():
    knowledge = Knowledge()
    knowledge.discover("mixed", {"mix-a": "messages", "mix-c": "chat"})
    gw = Gateway(parse_config(CONFIG, env={}), knowledge)
    models = {m["id"]: (m["mode"], m["backend"]) for m in gw.model_list()}
    assert models == {"claude-opus-4": ("messages", "claude"),  # the backend's declared api
                      "llama-3": ("chat", "chat"),
                      "claude-sonnet-4-5": ("messages", "mixed"),  # the built-in catalogue, on an auto backend
                      "mix-a": ("messages", "mixed"), "mix-c": ("chat", "mixed")}  # its /v1/models
    res = gw.classifier.resolve("mix-a")
    assert res is not None and res.source == "backend mixed /v1/models"


def test_resolve_names_the_pair_each_client_api_gets(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    assert main(["resolve", "--config", str(cfg), "claude-opus-4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "mode:     messages" in lines
    assert "chat client -> messages upstream; processor: translated to the messages API" in lines
    assert "responses client -> messages upstream; processor: translated to the messages API" in lines
    assert any(line.startswith("messages client -> messages upstream; fast path: Envoy routes it to 1 instance(s) "
                               "of llm.claude") for line in lines), lines
    assert main(["resolve", "--config", str(cfg), "llama-3"]) == 0
    assert "messages client -> chat upstream; processor: translated to the chat API" in capsys.readouterr().out


def _genai(m: Metrics) -> dict[tuple[str, str, str], float]:
    """(provider, model label, token type) -> tokens counted, from gen_ai_client_token_usage_sum."""
    return {(s.labels["gen_ai_provider_name"], s.labels["gen_ai_request_model"], s.labels["gen_ai_token_type"]): s.value
            for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples
            if s.name == "gen_ai_client_token_usage_sum"}


def test_a_messages_exchange_has_its_genai_metrics():
    """The provider is the backend's name (docs/deploy.md); Anthropic's input is counted as OpenAI counts
    it, its cached reads and writes included: 8 + 3 + 2 = 13 input tokens."""
    gw = Gateway(parse_config(CONFIG, env={}))
    m = Metrics()
    for model, answer in (
        ("claude-opus-4", {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4",
                           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                           "usage": {"input_tokens": 8, "cache_read_input_tokens": 3,
                                     "cache_creation_input_tokens": 2, "output_tokens": 5}}),
        ("llama-3", {"id": "c", "object": "chat.completion", "created": 1, "model": "llama-3",
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
                     "usage": {"prompt_tokens": 13, "completion_tokens": 5,
                               "prompt_tokens_details": {"cached_tokens": 3}}})):
        ex = Exchange(gw)
        ex.request_headers({":method": "POST", ":path": "/v1/messages", "content-type": "application/json",
                            "anthropic-version": "2023-06-01"}, False)
        ex.request_body(json.dumps({"model": model, "max_tokens": 16,
                                    "messages": [{"role": "user", "content": "hi"}]}).encode())
        ex.response_headers({":status": "200", "content-type": "application/json"})
        ex.response_body(json.dumps(answer).encode(), True)
        timer = m.timer()
        timer.message("response_body", timer.started, timer.started + 0.1)
        record(ex, m, timer, gw.classifier.label_for)
    assert _genai(m) == {("claude", "claude-opus-4", "input"): 13, ("claude", "claude-opus-4", "output"): 5,
                         ("chat", "llama-3", "input"): 13, ("chat", "llama-3", "output"): 5}


def test_a_claude_code_session_stays_on_one_instance():
    """Claude Code names its session in x-claude-code-session-id: its turns share an instance's prefix
    cache, as other clients' session headers do (the processor's ring; the fast path hashes on it too)."""
    from extproc.routing.gateway import placement_key

    gw = Gateway(parse_config("backends: [{name: vllm, api: chat, models: ['llama-*'], "
                              "endpoints: ['10.0.0.1:80', '10.0.0.2:80', '10.0.0.3:80']}]", env={}))
    backend = gw.config.backends[0]
    for session in ("s-1", "s-2", "s-3", "s-4"):
        headers = {"x-claude-code-session-id": session}
        assert placement_key({}, headers) == session
        assert len({gw.target(backend, placement_key({}, headers)).endpoint for _ in range(5)}) == 1
    assert len({gw.target(backend, placement_key({}, {"x-claude-code-session-id": f"s-{i}"})).endpoint
                for i in range(40)}) > 1  # sessions spread over the instances


def test_what_openai_clients_taught_routes_a_messages_client():
    """A model of an `auto` backend whose rejection taught it is Responses-only (learned from an OpenAI
    client's request: Messages requests teach nothing) takes a Messages client to /v1/responses."""
    from extproc.routing.classify import Classifier
    from extproc.routing.modes import Learned

    classifier = Classifier(parse_config(CONFIG, env={}))
    res = classifier.resolve("mix-agent", learned=Learned(mode="responses"))
    assert res is not None and res.source == "learned from a mixed rejection"
    assert res.upstream_api("messages") == "responses"
    unknown = classifier.resolve("mix-agent")
    assert unknown is not None and unknown.upstream_api("messages") == "chat"  # unknown API: Chat Completions
