"""Model groups and the failover policy (sans-IO): which backends form a group and in what order attempts
go, which upstream answers are failed over (real providers' error bodies), each backend's health as
Envoy's outlier detection would keep it, the one error of a request every member failed, the config
that sets it all, and where operators see it (check-config, resolve, /readyz, /metrics)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import gc
import time
import weakref
from collections import Counter

import orjson
import pytest

from extproc.cli import main as cli_main
from extproc.config import ConfigError, Failover, parse_config
from extproc.envoy.running import GatewayHolder, Sidecar
from extproc.exchange import Exchange
from extproc.ops.metrics import Metrics
from extproc.routing.classify import Classifier
from extproc.routing.compile import compile_routes
from extproc.routing.failover import (
    Attempt,
    Health,
    Transport,
    Verdict,
    all_failed_error,
    judge,
    retry_after_seconds,
)
from extproc.routing.gateway import Gateway
from extproc.routing.groups import Group, attempt_order, continue_order, group_for, groups
from extproc.routing.modes import Knowledge
from extproc.state.lookup import Lookup
from extproc.state.store import MemoryStore

GROUPS = """
backends:
  - {name: a, api: chat, models: ["m1", "m2", "m3"], endpoints: ["127.0.0.1:8001"]}
  - {name: b, api: chat, models: ["m1", "m2", "m2"], endpoints: ["127.0.0.1:8002"]}
  - {name: c, api: responses, models: ["m1", "*"], endpoints: ["127.0.0.1:8003"]}
  - {name: d, api: chat, models: ["m3*", "solo", "solo"], endpoints: ["127.0.0.1:8004"]}
"""


def names(backends: tuple[object, ...]) -> list[str]:
    return [b.name for b in backends]  # type: ignore[attr-defined]


# -- groups ---------------------------------------------------------------------------------------


def test_exact_names_listed_by_several_backends_form_groups_in_config_order():
    cfg = parse_config(GROUPS)
    found = groups(cfg)
    assert list(found) == ["m1", "m2"]  # m3 is matched by d's glob only: no group; solo is d's alone
    assert names(found["m1"].backends) == ["a", "b", "c"] and found["m1"].primary.name == "a"
    assert names(found["m2"].backends) == ["a", "b"]  # listed twice by b: b is one member
    assert group_for(cfg, "m3") is None and group_for(cfg, "solo") is None
    assert group_for(cfg, "anything-else") is None  # c's catch-all "*" makes no group


def test_groups_are_kept_with_their_config_and_freed_with_it():
    cfg = parse_config(GROUPS)
    assert groups(cfg) is groups(cfg)  # computed once per config
    other = dataclasses.replace(cfg, backends=cfg.backends[:1])
    assert list(groups(other)) == []  # a config derived from another gets its own groups
    gone = weakref.ref(cfg)
    del cfg, other
    gc.collect()
    assert gone() is None  # no module-level cache keeps a reloaded-away config alive


def test_the_primary_is_the_backend_the_model_resolves_to():
    cfg = parse_config("""
backends:
  - {name: glob-first, api: chat, models: ["m*"], endpoints: ["127.0.0.1:8001"]}
  - {name: a, api: chat, models: ["m1"], endpoints: ["127.0.0.1:8002"]}
  - {name: b, api: chat, models: ["m1"], endpoints: ["127.0.0.1:8003"]}
""")
    group = group_for(cfg, "m1")
    assert group is not None and names(group.backends) == ["a", "b"]
    assert Classifier(cfg).backend_for("m1") is group.primary  # an exact name beats an earlier glob
    with pytest.raises(TypeError):
        groups(cfg)["m1"] = group  # type: ignore[index]  # shared by every caller: read-only


def test_a_catch_all_never_joins_a_group():
    cfg = parse_config("""
backends:
  - {name: a, api: chat, models: ["m1"], endpoints: ["127.0.0.1:8001"]}
  - {name: star, api: chat, models: ["*"], endpoints: ["127.0.0.1:8002"]}
  - {name: b, api: chat, models: ["m1", "m?"], endpoints: ["127.0.0.1:8003"]}
""")
    assert names(group_for(cfg, "m1").backends) == ["a", "b"]  # type: ignore[union-attr]


def test_weights_reach_the_members():
    cfg = parse_config("""
backends:
  - {name: a, api: chat, models: ["m"], endpoints: ["127.0.0.1:8001"], weight: 3}
  - {name: b, api: chat, models: ["m"], endpoints: ["127.0.0.1:8002"]}
""")
    group = group_for(cfg, "m")
    assert group is not None
    assert [(m.backend.name, m.weight) for m in group.members] == [("a", 3), ("b", None)]


def _group(*members: tuple[str, int | None], unconfigured: frozenset[str] = frozenset()) -> Group:
    lines = ["backends:"]
    for name, weight in members:
        lines.append(f"  - {{name: {name}, api: chat, models: [m], endpoints: ['127.0.0.1:8001']"
                     + (f", weight: {weight}" if weight is not None else "")
                     + (", api_key_env: UNSET_KEY_FOR_TEST" if name in unconfigured else "") + "}")
    group = group_for(parse_config("\n".join(lines), env={}), "m")
    assert group is not None
    return group


def test_without_weights_attempts_follow_config_order_up_to_max_attempts():
    group = _group(("a", None), ("b", None), ("c", None), ("d", None))
    health = Health(Failover(max_attempts=3))
    assert names(attempt_order(group, "k", health, 0.0)) == ["a", "b", "c"]
    assert names(attempt_order(group, "k", health, 0.0, max_attempts=4)) == ["a", "b", "c", "d"]
    assert names(attempt_order(group, "k", Health(Failover(max_attempts=1)), 0.0)) == ["a"]


@pytest.mark.parametrize("weights", [(3, 1), (1, 1), (5, 3, 2)])
def test_weights_spread_first_attempts_by_their_shares(weights):
    members = [(f"w{i}", w) for i, w in enumerate(weights)] + [("plain", None)]
    group = _group(*members)
    health = Health(Failover(max_attempts=10))
    n = 20000
    firsts = Counter(attempt_order(group, f"session-{i}", health, 0.0)[0].name for i in range(n))
    assert "plain" not in firsts  # a member without a weight takes no first attempts
    for i, w in enumerate(weights):
        assert abs(firsts[f"w{i}"] / n - w / sum(weights)) < 0.02, firsts


def test_after_the_weighted_first_come_the_others_in_config_order():
    group = _group(("a", None), ("b", 1), ("c", None), ("d", 1))
    health = Health(Failover(max_attempts=10))
    for key in (f"k{i}" for i in range(50)):
        order = names(attempt_order(group, key, health, 0.0))
        assert order[0] in ("b", "d")
        assert order[1:] == [x for x in ["a", "b", "c", "d"] if x != order[0]]


def test_the_same_key_keeps_its_member_and_an_ejection_moves_only_that_members_keys():
    group = _group(("a", 1), ("b", 1), ("c", 1))
    health = Health(Failover(max_attempts=3, eject_after=1))
    keys = [f"conv-{i}" for i in range(3000)]
    before = {k: attempt_order(group, k, health, 0.0)[0].name for k in keys}
    assert before == {k: attempt_order(group, k, health, 0.0)[0].name for k in keys}  # deterministic
    health.record("a", False, 0.0)
    after = {k: attempt_order(group, k, health, 1.0)[0].name for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "a")
    assert {after[k] for k in keys if before[k] == "a"} == {"b", "c"}


def test_members_that_cannot_serve_go_last_and_are_tried_when_nothing_else_is_left():
    group = _group(("x", None), ("a", None), ("b", None), unconfigured=frozenset({"x"}))
    health = Health(Failover(max_attempts=3, eject_after=1))
    assert names(attempt_order(group, "k", health, 0.0)) == ["a", "b", "x"]  # x has no key: last
    health.record("a", False, 0.0)  # ejected for 30 s
    assert names(attempt_order(group, "k", health, 1.0)) == ["b", "a", "x"]
    health.record("b", False, 0.0, retry_after=10)  # ejected too (eject_after=1), and held off
    assert names(attempt_order(group, "k", health, 1.0)) == ["a", "b", "x"]  # all out: config order, x still last
    assert names(attempt_order(group, "k", health, 1.0, max_attempts=1)) == ["a"]
    assert names(attempt_order(group, "k", health, 31.0)) == ["a", "b", "x"]  # back by themselves
    health.record("b", True, 31.0)
    health.record("a", False, 31.0)
    assert names(attempt_order(group, "k", health, 32.0)) == ["b", "a", "x"]


def test_a_held_off_weighted_member_takes_no_first_attempts_meanwhile():
    group = _group(("a", 1), ("b", 1))
    health = Health(Failover(max_attempts=2))
    health.record("a", False, 0.0, retry_after=5)
    assert {attempt_order(group, f"k{i}", health, 1.0)[0].name for i in range(200)} == {"b"}
    assert {attempt_order(group, f"k{i}", health, 5.0)[0].name for i in range(200)} == {"a", "b"}


def test_a_conversation_the_sidecar_holds_continues_on_any_member_its_last_backend_first():
    group = _group(("a", None), ("b", None), ("c", None))
    health = Health(Failover(max_attempts=3, eject_after=1))
    assert names(continue_order(group, "k", health, 0.0, previous_backend="b")) == ["b", "a", "c"]
    health.record("b", False, 0.0)  # the previous turn's backend is out: the others first, it last
    assert names(continue_order(group, "k", health, 1.0, previous_backend="b")) == ["a", "c", "b"]
    assert names(continue_order(group, "k", health, 1.0, previous_backend="removed")) == ["a", "c", "b"]
    assert names(continue_order(group, "k", health, 1.0, max_attempts=2, previous_backend="c")) == ["c", "a"]
    assert names(continue_order(group, "k", health, 1.0, previous_backend=None)) == ["a", "c", "b"]


# -- judge: real error bodies ---------------------------------------------------------------------

OPENAI_429 = (b'{"error": {"message": "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): '
              b'Limit 30000, Used 29200, Requested 1500. Please try again in 1.4s. Visit https://platform.openai.com/'
              b'account/rate-limits to learn more.", "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}')
OPENAI_QUOTA = (b'{"error": {"message": "You exceeded your current quota, please check your plan and billing details.",'
                b' "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}')
OPENAI_500 = (b'{"error": {"message": "The server had an error while processing your request. Sorry about that!", '
              b'"type": "server_error", "param": null, "code": null}}')
OPENAI_503 = (b'{"error": {"message": "The engine is currently overloaded, please try again later.", '
              b'"type": "server_error", "param": null, "code": null}}')
OPENAI_CONTEXT = (b'{"error": {"message": "This model\'s maximum context length is 128000 tokens. However, your '
                  b'messages resulted in 130412 tokens. Please reduce the length of the messages.", "type": '
                  b'"invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}')
OPENAI_RESPONSES_CONTEXT = (b'{"error": {"message": "Your input exceeds the context window of this model. Please '
                            b'adjust your input and try again.", "type": "invalid_request_error", "param": "input", '
                            b'"code": "context_length_exceeded"}}')
OPENAI_KEY = (b'{"error": {"message": "Incorrect API key provided: sk-abc***xyz. You can find your API key at '
              b'https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "param": null, '
              b'"code": "invalid_api_key"}}')
OPENAI_MODEL = (b'{"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.", '
                b'"type": "invalid_request_error", "param": null, "code": "model_not_found"}}')
OPENAI_INVALID_PROMPT = (b'{"error": {"message": "Invalid prompt: your prompt was flagged as potentially violating '
                         b'our usage policy. Please try again with a different prompt.", "type": '
                         b'"invalid_request_error", "param": null, "code": "invalid_prompt"}}')
OPENAI_BAD_PARAM = (b'{"error": {"message": "Unrecognized request argument supplied: foo", "type": '
                    b'"invalid_request_error", "param": null, "code": null}}')
AZURE_FILTER = (b'{"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI\'s '
                b'content management policy. Please modify your prompt and retry.", "type": null, "param": "prompt", '
                b'"code": "content_filter", "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation", '
                b'"content_filter_result": {"hate": {"filtered": false, "severity": "safe"}, "violence": '
                b'{"filtered": true, "severity": "medium"}}}}}')
AZURE_429 = (b'{"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under Azure '
             b'OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. '
             b'Please retry after 6 seconds."}}')
AZURE_DEPLOYMENT = (b'{"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does '
                    b'not exist. If you created the deployment within the last 5 minutes, please wait a moment and '
                    b'try again."}}')
ANTHROPIC_429 = (b'{"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has '
                 b'exceeded your per-minute rate limit; see the response headers for current usage. Please reduce the '
                 b'prompt length or the maximum tokens requested, or try again later."}}')
ANTHROPIC_529 = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
ANTHROPIC_500 = b'{"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}'
ANTHROPIC_TOO_LONG = (b'{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: '
                      b'208310 tokens > 200000 maximum"}}')
ANTHROPIC_KEY = b'{"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}'
ANTHROPIC_PERMISSION = (b'{"type": "error", "error": {"type": "permission_error", "message": "Your API key does not '
                        b'have permission to use the specified resource."}}')
VLLM_CONTEXT = (b'{"object": "error", "message": "This model\'s maximum context length is 4096 tokens. However, you '
                b'requested 5000 tokens (1000 in the messages, 4000 in the completion). Please reduce the length of '
                b'the messages or completion.", "type": "BadRequestError", "param": null, "code": 400}')
VLLM_500_CONTEXT = (b'{"error": {"message": "The decoder prompt (length 5000) is longer than the maximum model length '
                    b'of 4096. Make sure that `max_model_len` is no smaller than the number of text tokens.", "type": '
                    b'"InternalServerError", "param": null, "code": 500}}')
VLLM_422 = (b'{"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required", "input": '
            b'{"model": "m"}}]}')
VLLM_DEAD = b'{"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}}'
LLAMA_CPP_CONTEXT = (b'{"error": {"code": 400, "message": "the request exceeds the available context size, try '
                     b'increasing the context size or enable context shift", "type": "exceed_context_size_error"}}')
GEMINI_CONTEXT = (b'[{"error": {"code": 400, "message": "The input token count (1200000) exceeds the maximum number of '
                  b'tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}]')
GEMINI_429 = (b'[{"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": '
              b'"RESOURCE_EXHAUSTED"}}]')
PROXY_500_CONTEXT = (b'{"error": {"message": "litellm.ContextWindowExceededError: litellm.BadRequestError: '
                     b'This model\'s maximum context length is 8192 tokens.", "type": null, "param": null, '
                     b'"code": "500"}}')
AZURE_500_FILTER = (b'{"error": {"message": "The server had an error processing your request.", "code": '
                    b'"content_filter", "status": 500}}')
# Envoy's local replies, raw and as deploy/envoy.yaml's local_reply_config writes them.
ENVOY_CONNECT = (b"upstream connect error or disconnect/reset before headers. reset reason: connection failure, "
                 b"transport failure reason: delayed connect error: 111")
ENVOY_RESET = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
ENVOY_RETRIED = (b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: "
                 b"remote connection failure, transport failure reason: delayed connect error: Connection refused")
ENVOY_NO_HEALTHY = b"no healthy upstream"
ENVOY_TIMEOUT = b"upstream request timeout"
ENVOY_JSON_CONNECT = (b'{"error":{"message":"upstream connect error or disconnect/reset before headers. reset reason: '
                      b'connection failure, transport failure reason: delayed connect error: 111","type":'
                      b'"gateway_error","param":null,"code":"upstream_reset_before_response_started{connection_failure}"}}')
ENVOY_JSON_TIMEOUT = (b'{"error":{"message":"the upstream did not answer within limits.upstream_timeout_seconds",'
                      b'"type":"gateway_error","param":null,"code":"upstream_timeout"}}')

FAILED_OVER = [
    (429, OPENAI_429), (429, OPENAI_QUOTA), (500, OPENAI_500), (503, OPENAI_503), (429, AZURE_429),
    (429, ANTHROPIC_429), (529, ANTHROPIC_529), (500, ANTHROPIC_500), (500, VLLM_DEAD), (429, GEMINI_429),
    (503, ENVOY_CONNECT), (503, ENVOY_RESET), (503, ENVOY_RETRIED), (503, ENVOY_NO_HEALTHY), (504, ENVOY_TIMEOUT),
    (503, ENVOY_JSON_CONNECT), (504, ENVOY_JSON_TIMEOUT), (408, b"Request Timeout"), (502, b"Bad Gateway"),
    (503, None), (500, b""),
]
FINAL = [
    (200, b'{"id": "chatcmpl-1"}'), (400, OPENAI_CONTEXT), (400, OPENAI_RESPONSES_CONTEXT), (401, OPENAI_KEY),
    (404, OPENAI_MODEL), (400, OPENAI_INVALID_PROMPT), (400, OPENAI_BAD_PARAM), (400, AZURE_FILTER),
    (404, AZURE_DEPLOYMENT), (400, ANTHROPIC_TOO_LONG), (401, ANTHROPIC_KEY), (403, ANTHROPIC_PERMISSION),
    (400, VLLM_CONTEXT), (422, VLLM_422), (400, LLAMA_CPP_CONTEXT), (400, GEMINI_CONTEXT), (413, b""),
    # 5xx wrappers whose body says the request itself is the problem: every backend would repeat it
    (500, VLLM_500_CONTEXT), (500, PROXY_500_CONTEXT), (500, AZURE_500_FILTER), (503, OPENAI_CONTEXT),
]


@pytest.mark.parametrize(("status", "body"), FAILED_OVER)
def test_answers_another_backend_might_serve_are_failed_over(status, body):
    assert judge(status, body) is Verdict.FAIL_OVER


@pytest.mark.parametrize(("status", "body"), FINAL)
def test_answers_every_backend_would_repeat_are_final(status, body):
    assert judge(status, body) is Verdict.FINAL


def test_a_401_is_failed_over_only_when_the_gateway_sent_its_own_key():
    assert judge(401, OPENAI_KEY) is Verdict.FINAL  # the client's key: another backend says the same
    assert judge(401, OPENAI_KEY, gateway_key=True) is Verdict.FAIL_OVER  # this backend's misconfigured key
    assert judge(403, ANTHROPIC_PERMISSION, gateway_key=True) is Verdict.FAIL_OVER
    assert judge(400, OPENAI_CONTEXT, gateway_key=True) is Verdict.FINAL


# -- retry-after ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "6"}, 6.0),
    ({"Retry-After": "0"}, 0.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # OpenAI's and Azure's precise one first
    ({"Retry-After-Ms": "250"}, 0.25),
    ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
    ({}, None),
    ({"retry-after": ""}, None),
    ({"retry-after": "-5"}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
])
def test_retry_after_in_seconds(headers, expected):
    assert retry_after_seconds(headers) == expected


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)  # "Fri, 15 Jan 2027 08:00:42 GMT"
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(42)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert retry_after_seconds({"retry-after": past}, now=now) == 0.0
    assert retry_after_seconds({"retry-after": "Fri, 31 Foo 2027 08:00:42 GMT"}, now=now) is None


@pytest.mark.parametrize("zone", ["", " -0000"])
def test_retry_after_a_date_without_a_zone_is_taken_as_gmt(zone):
    now = 1_800_000_000.0  # 2027-01-15 08:00:00 GMT
    assert retry_after_seconds({"retry-after": f"Fri, 15 Jan 2027 08:00:42{zone}"}, now=now) == pytest.approx(42)


# -- health: ejection step by step ----------------------------------------------------------------


def test_ejection_timeline_like_envoys_outlier_detection():
    h = Health(Failover(eject_after=3, eject_seconds=10, max_eject_seconds=25))
    h.record("a", False, 0.0)
    h.record("a", False, 1.0)
    assert h.state("a", 1.0) == "healthy"
    h.record("a", False, 2.0)  # third in a row: out for 10 s (once ejected)
    assert (h.state("a", 2.0), h.state("a", 11.9), h.state("a", 12.0)) == ("ejected", "ejected", "healthy")
    assert h.until("a", 5.0) == 12.0 and h.until("a", 12.0) is None
    h.record("a", False, 5.0)  # a failure while out changes nothing
    assert h.until("a", 5.0) == 12.0
    for t in (12.0, 13.0, 14.0):  # back, and failing again at once: twice ejected, 20 s
        h.record("a", False, t)
    assert h.state("a", 33.9) == "ejected" and h.state("a", 34.0) == "healthy"
    for t in (34.0, 35.0, 36.0):  # a third time: 30 s, capped at max_eject_seconds 25
        h.record("a", False, t)
    assert h.until("a", 36.0) == 61.0
    h.record("a", True, 61.0)
    for t in (96.0, 97.0, 98.0):  # 37 s in since 61: three eject_seconds periods take three off the count
        h.record("a", False, t)
    assert h.until("a", 98.0) == 108.0  # 10 s again: the multiplier decayed to one


def test_a_success_resets_the_count_of_consecutive_failures():
    h = Health(Failover(eject_after=3))
    for ok in (False, False, True, False, False):
        h.record("a", ok, 0.0)
    assert h.state("a", 0.0) == "healthy"
    h.record("a", False, 0.0)
    assert h.state("a", 0.0) == "ejected"


def test_a_429_or_408_holds_off_but_never_ejects_as_envoys_outlier_detection_counts_5xx_only():
    h = Health(Failover(eject_after=2, max_eject_seconds=60))
    for t in (0.0, 1.0, 2.0):
        h.record("a", False, t, retry_after=5, status=429)
    assert h.state("a", 2.0) == "held_off" and h.state("a", 7.0) == "healthy"
    h.record("b", False, 0.0, status=503)
    h.record("b", False, 1.0, status=408)  # an answer under 500 ends the run of 5xx, as in Envoy
    h.record("b", False, 2.0, status=503)
    assert h.state("b", 2.0) == "healthy"
    h.record("b", False, 3.0, status=502)
    assert h.state("b", 3.0) == "ejected"


def test_a_success_while_ejected_brings_the_backend_back_at_once():
    h = Health(Failover(eject_after=1, eject_seconds=30))
    h.record("a", False, 0.0)
    assert not h.available("a", 1.0)
    h.record("a", True, 1.0)
    assert h.available("a", 1.0) and h.state("a", 1.0) == "healthy"


def test_retry_after_holds_a_backend_off_for_that_long_capped():
    h = Health(Failover(eject_after=5, max_eject_seconds=60))
    h.record("a", False, 100.0, retry_after=7)
    assert (h.state("a", 100.0), h.state("a", 106.9), h.state("a", 107.0)) == ("held_off", "held_off", "healthy")
    assert not h.available("a", 103.0) and h.until("a", 103.0) == 107.0
    h.record("b", False, 0.0, retry_after=86400)  # a day asked: held off at most max_eject_seconds
    assert h.state("b", 59.9) == "held_off" and h.state("b", 60.0) == "healthy"
    h.record("c", False, 0.0, retry_after=30)
    h.record("c", True, 1.0)  # it served after all: the hold ends
    assert h.state("c", 1.0) == "healthy"


def test_ejected_wins_over_held_off_and_states_lists_every_backend():
    h = Health(Failover(eject_after=1, eject_seconds=10))
    h.record("a", False, 0.0, retry_after=20)
    assert h.state("a", 5.0) == "ejected" and h.state("a", 15.0) == "held_off" and h.state("a", 20.0) == "healthy"
    h.record("b", False, 0.0, retry_after=3)  # eject_after 1: out too
    assert h.states(5.0, ["x", "a"]) == {"x": "healthy", "a": "ejected", "b": "ejected"}
    assert h.states(25.0) == {"a": "healthy", "b": "healthy"}


# -- attempts and the all-failed error ------------------------------------------------------------


def test_an_answered_attempt_keeps_its_message_verdict_and_retry_after():
    a = Attempt.answered("claude", 429, ANTHROPIC_429, {"retry-after": "12"})
    assert (a.status, a.verdict, a.retry_after, a.outcome, a.ok) == (429, Verdict.FAIL_OVER, 12.0, "rate_limited", False)
    assert a.message.startswith("Number of request tokens has exceeded your per-minute rate limit")
    v = Attempt.answered("vllm", 400, VLLM_CONTEXT)
    assert (v.verdict, v.outcome, v.ok) == (Verdict.FINAL, "rejected", True)
    assert v.message.startswith("This model's maximum context length is 4096 tokens")
    assert Attempt.answered("x", 200, b"{}").outcome == "ok"
    assert Attempt.answered("x", 503, ENVOY_CONNECT).outcome == "failed"
    assert Attempt.answered("x", 504, ENVOY_JSON_TIMEOUT).outcome == "timeout"
    t = Attempt.failed("y", Transport.CONNECT_FAILURE, "111")
    assert (t.status, t.message, t.outcome, t.ok) == (None, "connection failed: 111", "connect_failure", False)


def all_failed(attempts: list[Attempt], client_api: str | None, model: str | None = None) -> tuple[int, bytes]:
    """The all-failed error's status and its body in `client_api`'s shape, as the attempts send them."""
    error = all_failed_error(attempts, model)
    return error.status, error.body(client_api)


def test_the_gateways_key_quoted_in_an_error_never_reaches_the_all_failed_message():
    key = "sk-gateway-0123456789abcdef"
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {key}. Or \\u0073k: {key[:3]}",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}})
    a = Attempt.answered("hosted", 401, body, key=key)
    assert a.verdict is Verdict.FAIL_OVER  # the sidecar's own key was refused: this backend's misconfiguration
    assert key not in a.message and "[redacted]" in a.message
    assert key.encode() not in all_failed([a], "chat")[1]


def test_all_failed_names_each_attempt_in_the_openai_shape():
    attempts = [Attempt.answered("vllm-a", 503, OPENAI_503), Attempt.failed("vllm-b", Transport.CONNECT_FAILURE),
                Attempt.answered("hosted", 429, OPENAI_429)]
    for api in ("chat", "responses", None):
        status, body = all_failed(attempts, api, "llama")
        doc = orjson.loads(body)
        assert status == 502
        assert doc == {"error": {
            "message": "every backend of model 'llama' failed (3 attempts): vllm-a: 503 The engine is currently "
                       "overloaded, please try again later.; vllm-b: connection failed; hosted: 429 "
                       + orjson.loads(OPENAI_429)["error"]["message"][:197] + "...",
            "type": "server_error", "param": None, "code": "all_backends_failed"}}


def test_all_failed_in_anthropics_shape_for_messages_clients():
    attempts = [Attempt.answered("claude", 529, ANTHROPIC_529), Attempt.failed("vllm", Transport.RESET)]
    status, body = all_failed(attempts, "messages")
    assert status == 502
    assert orjson.loads(body) == {"type": "error", "error": {
        "type": "api_error",
        "message": "every backend of this model failed (2 attempts): claude: 529 Overloaded; vllm: connection reset"}}


def test_all_failed_is_a_429_only_when_every_attempt_was_one_with_the_soonest_retry_after():
    attempts = [Attempt.answered("a", 429, AZURE_429, {"retry-after": "6"}),
                Attempt.answered("b", 429, ANTHROPIC_429, {"retry-after-ms": "2500"})]
    status, body = all_failed(attempts, "messages")
    assert status == 429 and orjson.loads(body)["error"]["type"] == "rate_limit_error"
    err = all_failed_error(attempts)
    assert err.code == "all_backends_rate_limited" and err.headers == (("retry-after", "3"),)
    mixed = [*attempts, Attempt.answered("c", 500, OPENAI_500)]
    assert all_failed(mixed, "chat")[0] == 502


def test_all_failed_is_a_504_when_the_last_attempt_timed_out():
    timed_out = [Attempt.answered("a", 503, OPENAI_503), Attempt.failed("b", Transport.TIMEOUT)]
    assert all_failed(timed_out, "chat")[0] == 504
    assert all_failed_error(timed_out).code == "all_backends_timed_out"
    envoy_timeout = [Attempt.answered("a", 429, OPENAI_429), Attempt.answered("b", 504, ENVOY_TIMEOUT)]
    assert all_failed(envoy_timeout, "responses")[0] == 504
    first_only = [Attempt.failed("a", Transport.TIMEOUT), Attempt.answered("b", 503, OPENAI_503)]
    assert all_failed(first_only, "chat")[0] == 502


# -- config ---------------------------------------------------------------------------------------


def test_failover_defaults_and_settings():
    assert parse_config(GROUPS).failover == Failover(3, 60, 5, 30, 300, 30)
    cfg = parse_config(GROUPS + "failover: {max_attempts: 2, deadline_seconds: 20, eject_after: 3, "
                                "eject_seconds: 10, max_eject_seconds: 40, attempt_timeout_seconds: 45}\n")
    assert cfg.failover == Failover(max_attempts=2, deadline_seconds=20, eject_after=3, eject_seconds=10,
                                    max_eject_seconds=40, attempt_timeout_seconds=45)
    assert cfg.failover.attempt_timeout == 20  # no attempt outlives the deadline
    assert parse_config(GROUPS).failover.attempt_timeout == 30


@pytest.mark.parametrize(("extra", "problem"), [
    ("failover: {max_attempts: 0}\n", "config.yaml:7: failover.max_attempts: must be between 1 and 10"),
    ("failover: {eject_after: x}\n", "config.yaml:7: failover.eject_after: must be a int, got 'x'"),
    ("failover: {retries: 2}\n", "config.yaml:7: failover.retries: unknown key (allowed: attempt_timeout_seconds, "
                                 "deadline_seconds, eject_after, eject_seconds, max_attempts, max_eject_seconds)"),
    ("failover: {eject_seconds: 60, max_eject_seconds: 30}\n",
     "config.yaml:7: failover.max_eject_seconds: must be at least eject_seconds (60)"),
    ("failover: [1]\n", "config.yaml:7: failover: must be a mapping"),
])
def test_failover_problems_with_their_line(extra, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(GROUPS.lstrip("\n") + "\n" + extra, source="config.yaml")
    assert e.value.problems == [problem]


@pytest.mark.parametrize(("weight", "problem"), [
    ("0", "must be between 1 and 10000"), ("-1", "must be between 1 and 10000"), ("x", "must be a int, got 'x'"),
    ("1.5", "must be a int, got 1.5"), ("true", "must be a int, got True"),
])
def test_a_weight_is_a_positive_integer(weight, problem):
    text = f"backends:\n  - name: a\n    api: chat\n    models: [m]\n    endpoints: ['127.0.0.1:1']\n    weight: {weight}\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="c.yaml")
    assert e.value.problems == [f"c.yaml:6: backends[0].weight: {problem}"]


# -- where operators see it -----------------------------------------------------------------------


WEIGHTED = """
failover: {max_attempts: 2}
backends:
  - {name: vllm-a, api: chat, models: ["llama", "qwen"], endpoints: ["127.0.0.1:8001"], weight: 3}
  - {name: vllm-b, api: chat, models: ["llama"], endpoints: ["127.0.0.1:8002"], weight: 1}
  - {name: hosted, api: responses, models: ["llama", "*"], endpoints: ["127.0.0.1:8003"]}
  - {name: lone, api: chat, models: ["solo"], endpoints: ["127.0.0.1:8004"], weight: 2}
"""


def test_check_config_says_which_models_form_groups(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(WEIGHTED)
    assert cli_main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        "  group llama: vllm-a, vllm-b, hosted: first attempts by weight (vllm-a 75%, vllm-b 25%), then the others "
        "in config order",
        "  note: lone's weight does nothing: no model it lists by name is listed by another backend"]
    path.write_text(GROUPS)
    assert cli_main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  group m1: a, b, c (config order; a is the primary)", "  group m2: a, b (config order; a is the primary)"]


def test_resolve_prints_the_group_its_members_and_the_attempt_order(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(GROUPS)
    assert cli_main(["resolve", "--config", str(path), "m1"]) == 0
    out = capsys.readouterr().out
    assert "group:    a, b, c (config order; a is the primary)\n" in out
    assert "  member a: mode chat (backend a api)\n  member c: mode responses (backend c api)\n" in out.replace(
        "  member b: mode chat (backend b api)\n", "")
    assert "attempts: a -> b -> c (at most 3; config order while every member is in)\n" in out
    assert "envoy:    one cluster per first attempt (group.a.b.c, group.b.a.c, group.c.a.b), the later attempts " \
        "in config order\n" in out
    assert cli_main(["resolve", "--config", str(path), "solo"]) == 0
    assert "group:    none (one backend serves this model: no failover)\n" in capsys.readouterr().out
    path.write_text(WEIGHTED)
    assert cli_main(["resolve", "--config", str(path), "llama"]) == 0
    out = capsys.readouterr().out
    assert "  member vllm-a: mode chat (backend vllm-a api), weight 3\n" in out
    assert "  member vllm-b: mode chat (backend vllm-b api), weight 1\n" in out
    assert "  member hosted: mode responses (backend hosted api)\n" in out
    # each possible first member with its share (3 of 3+1, 1 of 3+1), then config order, at most 2 members
    assert "attempts: at most 2; the first by weight, by a hash of the request's placement key" in out
    assert "\n           75%  vllm-a -> vllm-b\n           25%  vllm-b -> vllm-a\n" in out
    path.write_text(HOSTED_MEMBER)
    assert cli_main(["resolve", "--config", str(path), "m"]) == 0
    assert "envoy:    one cluster per first attempt (group.near.far, group.far.near), the later attempts in config " \
        "order; far by DNS, over its own TLS, with its Host and key put on by the processor (HTTP/1.1; no fast " \
        "path)\n" in capsys.readouterr().out
    # a `cluster:` member: refused where it is written, with what to do instead
    path.write_text(HOSTED_MEMBER.replace('url: "https://api.example.com"', "cluster: corp"))
    assert cli_main(["check-config", str(path)]) == 1
    said = capsys.readouterr()
    assert f"{path}:4: backends[1].models: 'm' is listed by 'near' too, which makes it a model group, and a " \
        "'cluster:' backend ('far', cluster 'corp') cannot be a member of one (the sidecar fails over between the " \
        "priorities of a cluster it compiles itself): give 'far' 'url:' (a hosted provider) or 'endpoints:' " \
        "instead of 'cluster:', or list 'm' on one of them only" in said.out + said.err
    path.write_text(HOSTED_MEMBER.replace('url: "https://api.example.com"', 'endpoints: ["127.0.0.1:8001"]'))
    assert cli_main(["check-config", str(path)]) == 0
    assert "  note: group m: near, far share instance 127.0.0.1:8001: an attempt there is always near's (attempts " \
        "are told apart by the instance)" in capsys.readouterr().out.splitlines()


def _resolved(tmp_path, text: str, model: str, capsys) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert cli_main(["resolve", "--config", str(path), model]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("attempts:"))
    return out[start:next(i for i, line in enumerate(out) if line.startswith("envoy:"))]


def test_resolve_prints_each_order_a_weighted_groups_attempts_take_with_its_share(tmp_path, capsys):
    """Weights 1, unconfigured 5, 2 and a member without one: the unconfigured member takes no first
    attempts (it can only answer 503), so the shares are 1/3 and 2/3; after the first, config order."""
    text = """
backends:
  - {name: a, api: chat, models: ["m"], endpoints: ["127.0.0.1:8001"], weight: 1}
  - {name: x, api: chat, models: ["m"], endpoints: ["127.0.0.1:8002"], weight: 5, api_key_env: UNSET_FOR_RESOLVE}
  - {name: b, api: chat, models: ["m"], endpoints: ["127.0.0.1:8003"], weight: 2}
  - {name: c, api: responses, models: ["m"], endpoints: ["127.0.0.1:8004"]}
"""
    lines = _resolved(tmp_path, text, "m", capsys)
    assert lines[1:3] == ["           33%  a -> x -> b", "           67%  b -> a -> x"]  # at most 3 (the default)
    assert len(lines) == 4  # no fast-path line: c's Responses API keeps every request on the processor


def test_resolve_names_the_real_order_when_the_primary_cannot_serve(tmp_path, capsys):
    """A primary without its key is not the first attempt; Envoy tries it second (config order after the
    first), as the cluster the hand-over names has it."""
    text = """
backends:
  - {name: x, api: chat, models: ["m"], endpoints: ["127.0.0.1:8001"], api_key_env: UNSET_FOR_RESOLVE}
  - {name: a, api: chat, models: ["m"], endpoints: ["127.0.0.1:8002"]}
  - {name: b, api: chat, models: ["m"], endpoints: ["127.0.0.1:8003"]}
"""
    assert _resolved(tmp_path, text, "m", capsys)[0] == \
        "attempts: a -> x -> b (at most 3; x cannot serve now, so a comes first; the later attempts in config order)"


def test_the_orders_resolve_prints_are_the_clusters_requests_are_handed_to(tmp_path, capsys):
    """What `resolve` prints for WEIGHTED's llama (all three members: max_attempts 3) against the group
    clusters 600 hand-overs name, by placement key: the same orders, in about the printed shares."""
    text = WEIGHTED.replace("failover: {max_attempts: 2}\n", "")
    lines = _resolved(tmp_path, text, "llama", capsys)
    printed = {order.replace(" -> ", "."): int(share.rstrip("%")) / 100
               for share, order in (line.split(None, 1) for line in lines[1:3])}
    assert printed == {"vllm-a.vllm-b.hosted": 0.75, "vllm-b.vllm-a.hosted": 0.25}
    gw = Gateway(parse_config(text), tenant_secret=b"s" * 32)
    n, seen = 600, Counter()
    for i in range(n):
        ex = Exchange(gw)
        step = ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json"},
                                  False)
        assert not isinstance(step, Lookup)
        step = ex.request_body(orjson.dumps({"model": "llama", "input": "hi", "prompt_cache_key": f"conv-{i}"}))
        assert not isinstance(step, Lookup) and ex.handed_over
        seen[dict(step.set_headers)["x-gateway-cluster"].removeprefix("group.")] += 1
    assert set(seen) == set(printed)
    for order, share in printed.items():  # within 4 standard deviations of the printed share
        assert abs(seen[order] / n - share) < 4 * (share * (1 - share) / n) ** 0.5, seen


@pytest.mark.parametrize(("members", "fast"), [
    ("  - {name: a, api: chat, models: [m], endpoints: ['127.0.0.1:8001']}\n"
     "  - {name: b, api: chat, models: [m], endpoints: ['127.0.0.1:8002']}\n", {"chat"}),  # keyless chat pools
    ("  - {name: a, api: chat, models: [m], endpoints: ['127.0.0.1:8001']}\n"
     "  - {name: b, api: responses, models: [m], endpoints: ['127.0.0.1:8002']}\n", set()),  # APIs differ
    ("  - {name: a, api: responses, models: [m], endpoints: ['127.0.0.1:8001']}\n"
     "  - {name: b, api: responses, models: [m], endpoints: ['127.0.0.1:8002']}\n", {"responses"}),
])
def test_resolve_says_a_grouped_models_path_as_the_compiled_routes_take_it(tmp_path, capsys, members, fast):
    """The chat client of a chat and a Responses member is not on the fast path, though its primary alone
    would be: every member must take it alike. `resolve` says what the compiled routes do."""
    text = "backends:\n" + members
    cfg = parse_config(text)
    routes = {r.name for r in compile_routes(cfg, Knowledge(), {}).routes.virtual_hosts[0].routes}
    assert {api for api in ("chat", "responses", "messages") if f"fast:{api}:group.a.b" in routes} == fast
    path = tmp_path / "g.yaml"
    path.write_text(text)
    assert cli_main(["resolve", "--config", str(path), "m"]) == 0
    said = {line.split(" client -> ")[0]: line for line in capsys.readouterr().out.splitlines() if " client -> " in line}
    assert {api for api, line in said.items() if "; fast path: " in line} == fast
    for api in fast:
        assert "Envoy routes it to the group's cluster fast-group.a.b, retrying on the next member" in said[api]
    if members.count("api: chat") == 1:
        assert "processor: a model group whose members do not all take the fast path alike" in said["chat"]


HOSTED_MEMBER = """
backends:
  - {name: near, api: chat, models: ["m"], endpoints: ["127.0.0.1:8001"]}
  - {name: far, api: chat, models: ["m"], url: "https://api.example.com"}
"""


def _sidecar(text: str) -> Sidecar:
    holder = GatewayHolder(Gateway(parse_config(text)))
    return Sidecar("unused.yaml", holder, MemoryStore(60, 100), Metrics())


def test_readyz_lists_each_backends_state_and_stays_ready():
    sidecar = _sidecar(GROUPS)
    health = sidecar.holder.gateway.health
    now = time.monotonic()
    for _ in range(5):
        health.record("a", False, now)
    health.record("b", False, now, retry_after=120)
    status, body, ctype = asyncio.run(sidecar.ready(""))
    doc = orjson.loads(body)
    assert (status, ctype, doc["status"], doc["unserved"]) == (200, "application/json", "ready", [])
    states = {b["name"]: b["state"] for b in doc["backends"]}
    assert states == {"a": "ejected", "b": "held_off", "c": "healthy", "d": "healthy"}
    back = {b["name"]: b.get("back_in_seconds") for b in doc["backends"]}
    assert 0 < back["a"] <= 30 and 0 < back["b"] <= 120 and back["c"] is None


def test_health_outlives_a_reload():
    sidecar = _sidecar(GROUPS)
    sidecar.holder.gateway.health.record("a", False, 0.0, retry_after=1e9)
    sidecar.install(parse_config(GROUPS + "failover: {max_eject_seconds: 600}\n"))
    health = sidecar.holder.gateway.health
    assert health.settings.max_eject_seconds == 600 and health.state("a", 1.0) == "held_off"


def test_metrics_count_attempts_and_show_backend_states():
    sidecar = _sidecar(GROUPS)
    metrics, health = sidecar.metrics, sidecar.holder.gateway.health
    now = time.monotonic()
    metrics.record_attempt(Attempt.answered("a", 429, OPENAI_429, {"retry-after": "30"}), health, now)
    metrics.record_attempt(Attempt.failed("b", Transport.CONNECT_FAILURE), health, now)
    metrics.record_attempt(Attempt.answered("c", 200, b"{}"), health, now)
    metrics.record_attempt(Attempt.answered("c", 400, OPENAI_CONTEXT), health, now)
    page = metrics.render().decode()
    for line in ('extproc_upstream_attempts_total{backend="a",outcome="rate_limited"} 1.0',
                 'extproc_upstream_attempts_total{backend="b",outcome="connect_failure"} 1.0',
                 'extproc_upstream_attempts_total{backend="c",outcome="ok"} 1.0',
                 'extproc_upstream_attempts_total{backend="c",outcome="rejected"} 1.0',
                 'extproc_backend_state{backend="a",state="held_off"} 1.0',
                 'extproc_backend_state{backend="a",state="healthy"} 0.0',
                 'extproc_backend_state{backend="b",state="healthy"} 1.0',
                 'extproc_backend_state{backend="d",state="ejected"} 0.0'):
        assert line in page.splitlines(), line
    assert health.state("a", now) == "held_off" and health.state("c", now) == "healthy"


def test_a_cluster_backend_in_a_group_is_refused_as_primary_or_not_and_only_there():
    """Envoy cannot fail over into or out of a cluster the user defined: a model listed exactly by a
    `cluster:` backend and another is a config error at the cluster backend, first or not; a pattern
    joins no group, so a cluster backend beside a catch-all (or a name only it lists) is as before."""
    first = """
backends:
  - {name: proxy, api: chat, models: ["m", "only-here"], cluster: corp}
  - {name: pool, api: chat, models: ["m", "*"], endpoints: ["127.0.0.1:8001"]}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(first)
    assert len(e.value.problems) == 1
    assert "backends[0].models: 'm' is listed by 'pool' too" in e.value.problems[0]
    config = parse_config(first.replace('["m", "only-here"]', '["only-here", "m-*"]'))
    assert groups(config) == {} and config.backend("proxy") is not None
