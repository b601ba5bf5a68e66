"""The `clients` section (keys as hashes, tenants, models, limits) and quota's windows and verdicts."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from time import time_ns

import pytest

from extproc import quota
from extproc.clients import TENANT_HEADER, Budget, TenantLimits, lua_pattern, lua_source
from extproc.config import ConfigError, parse_config
from extproc.state.store import MemoryStore, SQLiteStore

BACKEND = """
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["127.0.0.1:9"]
"""
SHA_BOB = hashlib.sha256(b"sk-bob").hexdigest()


def load(text: str, env: dict[str, str] | None = None):
    return parse_config(BACKEND + text, env=env or {})


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


# -- config ---------------------------------------------------------------------------------------

def test_keys_are_held_as_hashes_and_name_the_tenant_header():
    cfg = load(f"""
clients:
  - {{key_env: ALICE_KEY, tenant: alice, models: ["llama-3*"], requests_per_minute: 10}}
  - {{key_sha256: "{SHA_BOB}", tenant: bob, token_budget: {{tokens: 1000, per: month}}}}
""", env={"ALICE_KEY": "sk-alice"})
    alice, bob = cfg.clients.entries
    assert alice.key_sha256 == hashlib.sha256(b"sk-alice").hexdigest()
    assert "sk-alice" not in repr(cfg)  # the key itself is dropped at load
    assert (alice.tenant, alice.models, alice.limits.requests_per_minute) == ("alice", ("llama-3*",), 10)
    assert bob.limits == TenantLimits(token_budget=Budget(1000, "month"))
    assert cfg.tenancy.header == TENANT_HEADER
    assert cfg.clients.tenants == ("alice", "bob")


@pytest.mark.parametrize(("entry", "problem"), [
    ("{tenant: a}", "give exactly one of 'key_env'"),
    (f"{{key_sha256: '{SHA_BOB}', key_env: X, tenant: a}}", "give exactly one of 'key_env'"),
    ("{key_sha256: 'ABC', tenant: a}", "64 lower-case hex digits"),
    ("{key_env: UNSET_VAR, tenant: a}", "UNSET_VAR is not set"),
    (f"{{key_sha256: '{SHA_BOB}'}}", "tenant: required"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: 'a b'}}", "use letters, digits"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, models: ['x[12]']}}", "no '[...]'"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, models: []}}", "must list at least one model"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, requests_per_minute: 0}}", "between 1 and"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, token_budget: {{tokens: 5, per: week}}}}", "must be one of day, month"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, token_budget: {{per: day}}}}", "token_budget.tokens: required"),
    (f"{{key_sha256: '{SHA_BOB}', tenant: a, rpm: 3}}", "unknown key"),
])
def test_bad_entries_are_named(entry: str, problem: str):
    with pytest.raises(ConfigError) as e:
        load(f"clients:\n  - {entry}\n")
    assert problem in str(e.value), e.value.problems


def test_a_key_twice_and_a_tenant_with_two_sets_of_limits_are_refused():
    with pytest.raises(ConfigError, match="the same key is listed twice"):
        load(f"clients:\n  - {{key_sha256: '{SHA_BOB}', tenant: a}}\n  - {{key_env: K, tenant: b}}\n", env={"K": "sk-bob"})
    with pytest.raises(ConfigError, match="a tenant's keys share one set of limits"):
        load(f"clients:\n  - {{key_sha256: '{SHA_BOB}', tenant: a, requests_per_minute: 1}}\n"
             "  - {key_env: K, tenant: a, requests_per_minute: 2}\n", env={"K": "sk-other"})


def test_a_tenants_limits_given_on_one_key_hold_for_all_its_keys():
    cfg = load(f"clients:\n  - {{key_sha256: '{SHA_BOB}', tenant: a}}\n  - {{key_env: K, tenant: a, requests_per_minute: 2}}\n"
               "  - {key_env: L, tenant: b}\n", env={"K": "sk-other", "L": "sk-third"})
    assert [c.limits for c in cfg.clients.entries] == [TenantLimits(requests_per_minute=2)] * 2 + [TenantLimits()]
    assert 'limited = true' in lua_source(cfg.clients, "key").splitlines()[1]


def test_clients_and_another_tenancy_header_conflict():
    with pytest.raises(ConfigError, match=r"leave tenancy\.header out"):
        load(f"tenancy: {{header: x-user}}\nclients:\n  - {{key_sha256: '{SHA_BOB}', tenant: a}}\n")


def test_without_clients_a_backend_key_is_a_warning():
    cfg = parse_config(BACKEND.replace('endpoints: ["127.0.0.1:9"]', 'endpoints: ["127.0.0.1:9"]\n    api_key_env: K'),
                       env={"K": "sk-upstream"})
    assert cfg.clients is None and cfg.tenancy.header is None
    assert any("no 'clients' section: any caller" in w for w in cfg.warnings)


def test_lua_source_holds_hashes_tenants_limits_and_patterns_never_a_key():
    cfg = load(f"clients:\n  - {{key_sha256: '{SHA_BOB}', tenant: bob, models: ['gpt-5.?-*'], tokens_per_minute: 9}}\n"
               "  - {key_env: K, tenant: x.y}\n", env={"K": "sk-other"})
    key, models = lua_source(cfg.clients, "key"), lua_source(cfg.clients, "models")
    assert key.startswith('local STAGE, KEYS = "key", {\n'
                          f'  ["{SHA_BOB}"] = {{tenant = "bob", limited = true, models = {{"\\094gpt\\037\\0455\\037\\046\\046\\037\\045\\046\\042\\036"}}}},\n'
                          f'  ["{hashlib.sha256(b"sk-other").hexdigest()}"] = {{tenant = "x\\046y", limited = false}},\n}}\n')
    assert models.startswith('local STAGE, KEYS = "models", {\n' f'  ["{SHA_BOB}"]') and "sk-other" not in models
    assert "function envoy_on_request" in key and "sk-bob" not in key


def test_lua_pattern_escapes_every_magic_character():
    assert lua_pattern("a.b-c+d%e(f)*") == "^a%.b%-c%+d%%e%(f%).*$"


# -- windows and verdicts -------------------------------------------------------------------------

def test_windows_are_the_utc_minute_day_and_calendar_month():
    now = ts(2026, 12, 31, 23, 59, 30)
    assert quota.window("minute", now) == quota.Window(int(ts(2026, 12, 31, 23, 59)), int(ts(2027, 1, 1)))
    assert quota.window("day", now) == quota.Window(int(ts(2026, 12, 31)), int(ts(2027, 1, 1)))
    assert quota.window("month", now) == quota.Window(int(ts(2026, 12, 1)), int(ts(2027, 1, 1)))
    feb = quota.window("month", ts(2028, 2, 29, 12))
    assert (feb.end - feb.start) == 29 * 86400


@pytest.mark.parametrize(("seconds", "text"), [(0.45, "450ms"), (59.5, "59.5s"), (90, "1m30s"), (7200, "2h0m0s"),
                                               (1, "1s")])
def test_reset_times_are_written_as_openai_does(seconds: float, text: str):
    assert quota.duration(seconds) == text


LIMITS = TenantLimits(requests_per_minute=3, tokens_per_minute=100, token_budget=Budget(1000, "day"))


def test_counters_are_per_tenant_and_window_and_outlive_it_a_little():
    now = ts(2026, 5, 4, 10, 20, 15)
    found, changes = quota.check_changes("t1", LIMITS, now)
    assert [c.name for c in found] == ["requests", "tokens", "budget"]
    minute, day = int(ts(2026, 5, 4, 10, 20)), int(ts(2026, 5, 4))
    assert changes == [(f"quota:t1:requests:minute:{minute}", 1, 45 + 60), (f"quota:t1:tokens:minute:{minute}", 0, 105),
                       (f"quota:t1:budget:day:{day}", 0, int(ts(2026, 5, 5) - now) + 60)]
    assert quota.usage_changes("t1", LIMITS, now, 42) == [(k, 42, ttl) for k, _, ttl in changes[1:]]
    assert quota.usage_changes("t1", TenantLimits(requests_per_minute=3), now, 42) == []


def test_verdict_within_limits_gives_the_headers():
    now = ts(2026, 5, 4, 10, 20, 15)
    found, _ = quota.check_changes("t1", LIMITS, now)
    v = quota.verdict(LIMITS, found, [3, 99, 999], now)
    assert v.refusal is None
    assert v.headers == [("x-ratelimit-limit-requests", "3"), ("x-ratelimit-remaining-requests", "0"),
                         ("x-ratelimit-reset-requests", "45s"), ("x-ratelimit-limit-tokens", "100"),
                         ("x-ratelimit-remaining-tokens", "1"), ("x-ratelimit-reset-tokens", "45s")]


@pytest.mark.parametrize(("values", "limit", "retry"), [([4, 0, 0], "requests", 45), ([1, 100, 0], "tokens", 45),
                                                        ([1, 0, 1000], "budget", 13 * 3600 + 39 * 60 + 45),
                                                        ([4, 100, 1000], "budget", 13 * 3600 + 39 * 60 + 45)])
def test_verdict_over_a_limit_refuses_until_the_longest_window_ends(values: list[int], limit: str, retry: int):
    now = ts(2026, 5, 4, 10, 20, 15)
    found, _ = quota.check_changes("t1", LIMITS, now)
    v = quota.verdict(LIMITS, found, values, now)
    assert v.refusal == quota.Refusal(limit, retry)
    assert ("retry-after", str(retry)) in v.headers


def test_refusal_bodies_take_the_callers_shape():
    r = quota.Refusal("budget", 60)
    openai = json.loads(quota.refusal_body("/v1/chat/completions", "t1", LIMITS, r))
    assert openai["error"]["code"] == "insufficient_quota" and "1000 per day" in openai["error"]["message"]
    assert json.loads(quota.refusal_body("/v1/responses", "t1", LIMITS, quota.Refusal("requests", 3)))["error"][
        "code"] == "rate_limit_exceeded"
    anthropic = json.loads(quota.refusal_body("/v1/messages", "t1", LIMITS, r))
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "rate_limit_error"


# -- store counters -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_counters_add_up_and_expire(kind: str, tmp_path, monkeypatch):
    import time

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "time", lambda: clock[0])
    store = MemoryStore(3600, 1000) if kind == "memory" else SQLiteStore(str(tmp_path / "s.db"), 3600)

    async def run() -> list[list[int]]:
        out = [await store.incr([("a", 1, 60), ("b", 0, 60)]), await store.incr([("a", 1, 60), ("b", 5, 60)])]
        clock[0] += 30  # a running counter keeps the end it was given
        out.append(await store.incr([("a", 2, 600)]))
        clock[0] += 31
        out.append(await store.incr([("a", 1, 60)]))
        return out

    assert asyncio.run(run()) == [[1, 0], [2, 5], [4], [1]]


def test_the_compiled_routes_carry_the_key_check_only_with_a_clients_section():
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
    from envoy.extensions.filters.http.lua.v3 import lua_pb2

    from extproc.routing.compile import compile_routes
    from extproc.routing.modes import Knowledge

    plain = compile_routes(load(""), Knowledge(), {}).routes.virtual_hosts[0]
    assert not any("lua" in name for name in plain.typed_per_filter_config) and not plain.request_headers_to_remove
    keyed = compile_routes(load(f"clients:\n  - {{key_sha256: '{SHA_BOB}', tenant: bob, models: [m]}}\n"),
                           Knowledge(), {})
    host = keyed.routes.virtual_hosts[0]
    for name, stage in (("envoy.filters.http.lua.clients", "key"), ("envoy.filters.http.lua.client_models", "models")):
        on, per_route = rc.FilterConfig(), lua_pb2.LuaPerRoute()  # deploy/envoy.yaml lists both as disabled
        assert host.typed_per_filter_config[name].Unpack(on) and not on.disabled
        assert on.config.Unpack(per_route)
        assert per_route.source_code.inline_string.startswith(f'local STAGE, KEYS = "{stage}"')
    assert "envoy.filters.http.ratelimit" not in host.typed_per_filter_config  # no tenant has limits
    assert list(host.request_headers_to_remove) == [TENANT_HEADER]
    refused = host.routes[0]  # a request the script refuses: Envoy's reply opens no stream to the processor
    assert [(h.name, h.present_match) for h in refused.match.headers] == [("x-gateway-refused", True)]
    off = ext_proc_pb2.ExtProcPerRoute()
    assert refused.typed_per_filter_config["envoy.filters.http.ext_proc"].Unpack(off) and off.disabled
    assert plain.routes[0].name != "refused"


def test_the_allow_list_stage_and_the_rate_limits_are_turned_on_only_when_needed():
    """deploy/envoy.yaml lists the models stage and the rate-limit filter as disabled: a filter with
    nothing to do would still cost every request (benchmarks/fastpath_cost.py)."""
    from envoy.config.route.v3 import route_components_pb2 as rc

    from extproc.routing.compile import compile_routes
    from extproc.routing.modes import Knowledge

    def filters(clients: str) -> set[str]:
        host = compile_routes(load(f"clients:\n  - {clients}\n"), Knowledge(), {}).routes.virtual_hosts[0]
        for config in host.typed_per_filter_config.values():
            on = rc.FilterConfig()
            assert config.Unpack(on) and not on.disabled
        return set(host.typed_per_filter_config) - {"envoy.filters.http.ext_proc"}

    assert filters(f"{{key_sha256: '{SHA_BOB}', tenant: bob}}") == {"envoy.filters.http.lua.clients"}
    assert filters(f"{{key_sha256: '{SHA_BOB}', tenant: bob, requests_per_minute: 3}}") == \
        {"envoy.filters.http.lua.clients", "envoy.filters.http.ratelimit"}
    assert filters(f"{{key_sha256: '{SHA_BOB}', tenant: bob, models: [m]}}") == \
        {"envoy.filters.http.lua.clients", "envoy.filters.http.lua.client_models"}


def test_redis_counters_are_shared_and_keep_their_windows_ttl(redis_server):
    import redis

    from extproc.state.store import RedisStore

    key = f"quota:test:{time_ns()}"

    async def run() -> list[list[int]]:
        replicas = [RedisStore(redis_server.url, ttl=3600, timeout=1.0) for _ in range(2)]
        out = [await replicas[0].incr([(key, 1, 90)]), await replicas[1].incr([(key, 1, 5000)]),
               await replicas[0].incr([(key, 0, 90), (key + ":other", 7, 90)])]
        for r in replicas:
            await r.close()
        return out

    assert asyncio.run(run()) == [[1], [2], [2, 7]]
    ttl = redis.Redis.from_url(redis_server.url).ttl("extproc:" + key)
    assert 80 <= ttl <= 90  # the first increment's window; a later one does not extend it
