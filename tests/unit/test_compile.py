"""The route compiler: Envoy's first-match over the compiled routes gives the processor's own decision.

`first_match` below reads the compiled protos the way Envoy does (path, headers, dynamic metadata,
first route wins; RE2 full match stands in as Python's re.fullmatch for the simple regexes used),
so every name can be checked against `Classifier.resolve` + `decide` computed separately. The real
Envoy does the same check through real requests in tests/test_e2e_fastpath.py.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest

from extproc.api import CHAT, PATHS, RESPONSES
from extproc.config import parse_config
from extproc.routing.classify import Classifier
from extproc.routing.compile import compile_routes, decide, glob_regex
from extproc.routing.modes import Knowledge, Learned

CONFIG = """
backends:
  - name: chatty
    api: chat
    models: ["llama-*", "qwen3-8b", "shared-*"]
    endpoints: ["10.0.0.1:8000", "10.0.0.2:8000"]
  - name: keyed
    api: chat
    models: ["keyed-*"]
    endpoints: ["10.0.0.3:8000"]
    api_key_env: KEY
  - name: codex
    api: responses
    models: ["gpt-5.3-codex", "resp-*", "shared-x*"]
    endpoints: ["10.0.0.4:8000"]
  - name: hosted
    api: both
    models: ["gpt-4o*", "o1-pro*"]
    cluster: openai
  - name: open
    api: auto
    models: ["*"]
    endpoints: ["10.0.0.5:8000"]
    path_prefix: /openai
model_rules:
  - match: "llama-r*"
    mode: responses
  - match: "llama-nt*"
    translate: false
  - match: "qwen3-8b"
    mode: responses
  - match: "auto-chat-*"
    mode: chat
"""
NAMES = ["llama-3", "llama-r1", "llama-nt", "qwen3-8b", "shared-a", "shared-x1", "keyed-1", "gpt-5.3-codex",
         "resp-1", "gpt-4o", "gpt-4o-mini", "o1-pro", "o1-pro-2025", "gpt-5.3-codex-mini", "my-codex-7",
         "vllm-model", "auto-chat-1", "found-chat", "found-resp", "learned-resp", "learned-ok", "", "x" * 300,
         "deep-research-1", "gpt-4o-audio-preview-1", "a\nb"]


def config(text: str = CONFIG, **env: str):
    return parse_config(text, env={"KEY": "sk-1", **env})


def knowledge() -> Knowledge:
    k = Knowledge()
    k.discover("open", {"found-chat": CHAT, "found-resp": RESPONSES, "vllm-model": None})
    return k


LEARNED = {("open", "learned-resp"): Learned(RESPONSES), ("open", "learned-ok"): Learned(None, {CHAT})}


def _value_matches(matcher: Any, value: Any) -> bool:
    kind = matcher.WhichOneof("match_pattern")
    if kind == "or_match":
        return any(_value_matches(m, value) for m in matcher.or_match.value_matchers)
    if kind == "present_match":
        return (value is not None) == matcher.present_match
    if kind == "bool_match":
        return value is matcher.bool_match
    if kind == "string_match":
        if not isinstance(value, str):
            return False
        sm = matcher.string_match
        if sm.WhichOneof("match_pattern") == "exact":
            return value == sm.exact
        return re.fullmatch(sm.safe_regex.regex, value) is not None
    raise AssertionError(kind)


def first_match(compiled, path: str, metadata: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    headers = headers or {}
    for route in compiled.routes.virtual_hosts[0].routes:
        m = route.match
        if m.WhichOneof("path_specifier") == "path" and m.path != path:
            continue
        if m.WhichOneof("path_specifier") == "prefix" and not path.startswith(m.prefix):
            continue
        ok = True
        for h in m.headers:
            got = headers.get(h.name)
            hit = got is not None if h.HasField("present_match") else got == h.string_match.exact
            ok = ok and hit != h.invert_match
        for d in m.dynamic_metadata:
            ok = ok and _value_matches(d.value, metadata.get(d.path[0].key)) != d.invert
        if ok:
            return route.name
    raise AssertionError("no route matched")


def expected(cfg, name: str, api: str) -> str:
    classifier = Classifier(cfg, knowledge())
    backend = classifier.backend_for(name)
    fact = LEARNED.get((backend.name, name)) if backend else None
    res = classifier.resolve(name, learned=fact) if name else None
    return f"fast:{api}:{res.backend.name}" if decide(cfg, res, api, fact).fast else "processor"


@pytest.mark.parametrize("usage", ["all", "translated"])
def test_every_name_routes_as_the_processor_decides(usage):
    cfg = config(CONFIG + f"usage_accounting: {usage}\n")
    compiled = compile_routes(cfg, knowledge(), LEARNED)
    for name in NAMES:
        chat = first_match(compiled, PATHS[CHAT], {"model": name})
        assert chat == expected(cfg, name, CHAT), name
        resp = first_match(compiled, PATHS[RESPONSES], {"model": name, "store": False})
        assert resp == expected(cfg, name, RESPONSES), name


def test_a_body_that_may_name_model_twice_takes_no_fast_route():
    """deploy/envoy.yaml's Lua marks it: Envoy routes by one `model`, the backend may run the other."""
    cfg = config()
    compiled = compile_routes(cfg, knowledge(), LEARNED)
    fast = [n for n in NAMES if expected(cfg, n, CHAT) != "processor"]
    assert fast  # the premise: names a fast route takes
    for name in fast:
        assert first_match(compiled, PATHS[CHAT], {"model": name, "model_twice": True}) == "processor", name
        assert first_match(compiled, PATHS[RESPONSES], {"model": name, "store": False, "model_twice": True}) == \
            "processor", name


def test_names_checked_cover_both_paths():
    cfg = config()
    got = {expected(cfg, n, api) for n in NAMES for api in (CHAT, RESPONSES)}
    assert {"processor", "fast:chat:chatty", "fast:responses:codex", "fast:chat:hosted", "fast:responses:hosted",
            "fast:chat:open", "fast:responses:open"} <= got


def test_specific_decisions():
    cfg = config()
    compiled = compile_routes(cfg, knowledge(), LEARNED)
    route = {n: first_match(compiled, PATHS[CHAT], {"model": n}) for n in
             ("llama-3", "llama-r1", "keyed-1", "vllm-model", "found-chat", "learned-ok", "learned-resp", "my-codex-7")}
    assert route == {"llama-3": "fast:chat:chatty", "llama-r1": "processor",  # model rule: responses, translated
                     "keyed-1": "processor",  # the API key is added by the processor only
                     "vllm-model": "processor",  # auto backend, nothing known: learning
                     "found-chat": "fast:chat:open", "learned-ok": "fast:chat:open", "learned-resp": "processor",
                     "my-codex-7": "processor"}  # catalogue: a Responses model on an auto backend


def test_responses_fast_only_without_state():
    compiled = compile_routes(config(), knowledge(), LEARNED)
    path = PATHS[RESPONSES]
    assert first_match(compiled, path, {"model": "resp-1", "store": False}) == "fast:responses:codex"
    for extra in ({}, {"store": True}, {"store": "false"}, {"store": False, "previous_response_id": "resp_1"},
                  {"store": False, "conversation": "conv_1"}):
        assert first_match(compiled, path, {"model": "resp-1", **extra}) == "processor", extra
    assert first_match(compiled, path, {"model": "resp-1", "store": False}, {"content-encoding": "gzip"}) == "processor"


def test_chat_streams_need_usage_on_the_fast_path_when_all_is_counted():
    compiled = compile_routes(config(), knowledge(), LEARNED)
    path = PATHS[CHAT]
    assert first_match(compiled, path, {"model": "llama-3", "stream": True}) == "processor"
    assert first_match(compiled, path, {"model": "llama-3", "stream": True, "include_usage": True}) == "fast:chat:chatty"
    lean = compile_routes(config(CONFIG + "usage_accounting: translated\n"), knowledge(), LEARNED)
    assert first_match(lean, path, {"model": "llama-3", "stream": True}) == "fast:chat:chatty"


def test_mode_header_keeps_the_processor_when_honoured():
    cfg = config(CONFIG + "discovery: {allow_mode_header: true}\n")
    compiled = compile_routes(cfg, knowledge(), LEARNED)
    assert first_match(compiled, PATHS[CHAT], {"model": "llama-3"}) == "fast:chat:chatty"
    assert first_match(compiled, PATHS[CHAT], {"model": "llama-3"}, {"x-gateway-model-mode": "responses"}) == "processor"


def test_fast_path_off_compiles_only_processor_routes():
    compiled = compile_routes(config(CONFIG + "fast_path: false\n"), knowledge(), LEARNED)
    names = [r.name for r in compiled.routes.virtual_hosts[0].routes]
    assert names == ["websocket", "processor:follow", "processor:first-contact", "processor:endpoint", "processor:openai", "processor"]


def test_routing_headers_select_processor_routes_first():
    compiled = compile_routes(config(), knowledge(), LEARNED)
    assert first_match(compiled, PATHS[CHAT], {"model": "llama-3"}, {"x-gateway-destination-endpoint": "1.2.3.4:5"}) \
        == "processor:endpoint"
    assert first_match(compiled, PATHS[CHAT], {"model": "llama-3"}, {"x-gateway-cluster": "openai"}) == "processor:openai"
    # a background response's stream, whatever the request was: to the front door (the websocket cluster)
    assert first_match(compiled, PATHS[RESPONSES], {"model": "llama-3"}, {"x-gateway-follow": "t;x"}) == "processor:follow"
    follow = {r.name: r for r in compiled.routes.virtual_hosts[0].routes}["processor:follow"]
    assert follow.route.cluster == "websocket" and follow.route.timeout.seconds == 0


def test_clusters_and_actions():
    compiled = compile_routes(config(), knowledge(), LEARNED)
    clusters = {c.name: c for c in compiled.clusters}
    assert sorted(clusters) == ["llm.chatty", "llm.codex", "llm.keyed", "llm.open"]
    chatty = clusters["llm.chatty"]
    assert chatty.lb_policy == chatty.RING_HASH
    assert [e.endpoint.address.socket_address.port_value for e in chatty.load_assignment.endpoints[0].lb_endpoints] \
        == [8000, 8000]
    assert clusters["llm.codex"].lb_policy == chatty.ROUND_ROBIN
    routes = {r.name: r for r in compiled.routes.virtual_hosts[0].routes}
    assert [h.header.header_name for h in routes["fast:chat:chatty"].route.hash_policy] == \
        ["session-id", "x-session-id", "conversation-id", "thread-id", "x-claude-code-session-id"]
    assert routes["fast:chat:open"].route.prefix_rewrite == "/openai/v1/chat/completions"
    assert routes["fast:chat:hosted"].route.cluster == "openai"
    assert routes["fast:chat:hosted"].route.auto_host_rewrite.value is True
    assert "envoy.filters.http.ext_proc" in routes["fast:chat:chatty"].typed_per_filter_config


def test_the_processor_is_on_for_every_route_the_virtual_host_holds():
    """deploy/envoy.yaml lists ext_proc as disabled (so Envoy's refusal of a request no route took is
    not held for it): the virtual host must turn it on, and only fast routes and the socket off."""
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

    host = compile_routes(config(), knowledge(), LEARNED).routes.virtual_hosts[0]
    on = rc.FilterConfig()
    assert host.typed_per_filter_config["envoy.filters.http.ext_proc"].Unpack(on)
    assert not on.disabled and not on.is_optional
    per_route = ext_proc_pb2.ExtProcPerRoute()
    assert on.config.Unpack(per_route) and not per_route.disabled
    off = {r.name for r in host.routes if "envoy.filters.http.ext_proc" in r.typed_per_filter_config}
    assert off == {r.name for r in host.routes if r.name.startswith("fast:")} | {"websocket"}


def test_decide_reasons():
    cfg = config()
    classifier = Classifier(cfg, knowledge())
    assert "API key" in decide(cfg, classifier.resolve("keyed-1"), CHAT).reason
    assert "translated" in decide(cfg, classifier.resolve("llama-3"), RESPONSES).reason
    assert "learned" in decide(cfg, classifier.resolve("vllm-model"), CHAT).reason
    assert "404" in decide(cfg, None, CHAT).reason
    assert "store: false" in decide(cfg, classifier.resolve("resp-1"), RESPONSES).reason


@pytest.mark.parametrize("pattern", ["*", "gpt-*", "a?b", "[abc]x", "[!a]*", "x.y+z", "*codex*", "[^a]", "a[b",
                                     "(a)|b", "a{2}", "$x^"])
def test_glob_regex_matches_like_fnmatch(pattern):
    names = ["gpt-4", "a\nb", "axb", "bx", "ax", "x.y+z", "gpt-5.3-codex", "^", "a[b", "(a)|b", "aa", "a{2}",
             "$x^", "b", "\\", ""]
    for name in names:
        assert bool(re.fullmatch(glob_regex(pattern), name)) == (fnmatch.fnmatchcase(name, pattern) and name != ""), \
            (pattern, name)


def test_resolve_command_says_which_path(tmp_path, capsys):
    from extproc.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text("backends: [{name: vllm, api: chat, models: ['llama-*'], endpoints: ['127.0.0.1:9']}]\n")
    assert main(["resolve", "--config", str(cfg), "llama-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("chat client -> chat upstream; fast path: Envoy routes it to 1 instance(s) of llm.vllm")
               for line in lines), lines
    assert "responses client -> chat upstream; processor: translated to the chat API" in lines


def test_many_known_names_make_few_routes():
    before = len(compile_routes(config(), knowledge(), LEARNED).routes.virtual_hosts[0].routes)
    k = knowledge()
    k.discover("open", {f"found-{i}": CHAT for i in range(500)})
    compiled = compile_routes(config(), k, LEARNED)
    assert len(compiled.routes.virtual_hosts[0].routes) == before  # they join the routes of found-chat
    assert first_match(compiled, PATHS[CHAT], {"model": "found-321"}) == "fast:chat:open"
    assert first_match(compiled, PATHS[RESPONSES], {"model": "found-321", "store": False}) == "processor"  # learning
