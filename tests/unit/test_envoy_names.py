"""deploy/envoy.yaml holds what extproc/envoy/names.py says: the metadata rules exactly as generated, and
every header, namespace and key it names that the sidecar also names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.api import PATHS
from extproc.cli import main
from extproc.envoy.names import (
    ANTHROPIC_TYPE_CEL,
    API_PATH_REGEX,
    FIRST_CONTACT_ROLE,
    H_ENDPOINT,
    H_FAILOVER,
    H_FIRST_CONTACT,
    H_FOLLOW,
    H_RETRIED,
    H_RETRY,
    NAMESPACE,
    REFUSED_HEADER,
    REQUEST_FIELDS,
    ROLE_METADATA,
    ROUTING_HEADERS,
    TENANT_HEADER,
    Key,
    json_to_metadata_rules,
    messages_local_reply,
    model_reader_rules,
    sse_to_metadata_rules,
)
from extproc.errors import anthropic_type

ENVOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "envoy.yaml"


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_YAML.read_text())


def named(tree: Any, name: str) -> list[dict[str, Any]]:
    """Every mapping in the config with this `name`."""
    found = []
    if isinstance(tree, dict):
        if tree.get("name") == name:
            found.append(tree)
        tree = list(tree.values())
    if isinstance(tree, list):
        for child in tree:
            found += named(child, name)
    return found


def test_json_to_metadata_rules_are_the_generated_ones(envoy):
    [delegate] = named(envoy, "envoy.filters.http.match_delegate")
    [flt] = named(delegate, "envoy.filters.http.json_to_metadata")
    config = flt["typed_config"]
    assert {k: v for k, v in config.items() if k != "@type"} == json_to_metadata_rules()


def test_the_other_paths_model_reader_is_the_generated_one(envoy):
    """The key check's models stage reads the model on every other path with a JSON body."""
    [delegate] = named(envoy, "envoy.filters.http.match_delegate.request_model")
    [flt] = named(delegate, "envoy.filters.http.json_to_metadata")
    assert {k: v for k, v in flt["typed_config"].items() if k != "@type"} == model_reader_rules()
    assert [r["on_present"]["key"] for r in model_reader_rules()["request_rules"]["rules"]] == ["model"]


def test_sse_to_metadata_rules_are_the_generated_ones(envoy):
    [flt] = named(envoy, "envoy.filters.http.sse_to_metadata")
    assert flt["typed_config"]["response_rules"] == sse_to_metadata_rules()


def test_json_to_metadata_reads_the_bodies_of_every_api_path():
    assert f'regex: "{API_PATH_REGEX}"'.replace("\\", "\\\\") in ENVOY_YAML.read_text()
    skipped = re.compile(API_PATH_REGEX)
    for path in ("/v1/chat/completions", "/v1/responses?x=1", "/v1/messages", "/v1/messages?beta=true"):
        assert skipped.fullmatch(path)
    assert not skipped.fullmatch("/v1/messages/count_tokens") and not skipped.fullmatch("/v1/embeddings")


def test_the_generated_rules_read_the_fields_the_routes_match():
    """Spelled out here, not from names.py: a request field lost from the rules fails this."""
    request = json_to_metadata_rules()["request_rules"]["rules"]
    assert [([s["key"] for s in r["selectors"]], r["on_present"]["key"]) for r in request] == [
        (["model"], "model"), (["stream"], "stream"), (["stream_options", "include_usage"], "include_usage"),
        (["store"], "store"), (["previous_response_id"], "previous_response_id"), (["conversation"], "conversation"),
        (["conversation", "id"], "conversation")]
    assert len(REQUEST_FIELDS) == len(request)


def test_access_log_reads_only_keys_in_the_namespace(envoy):
    used = re.findall(r"%DYNAMIC_METADATA\(([^:)]+):([^)]+)\)%", ENVOY_YAML.read_text())
    assert used
    keys = {v for k, v in vars(Key).items() if k.isupper()}
    assert {ns for ns, _ in used} == {NAMESPACE}
    assert {key for _, key in used} <= keys


def test_headers_and_metadata_shared_with_the_sidecar(envoy):
    mutation, upstream_mutation = named(envoy, "envoy.filters.http.header_mutation")  # the edge's, the instances'
    removed = {m["remove"] for m in mutation["typed_config"]["mutations"]["request_mutations"] if "remove" in m}
    assert removed == {*ROUTING_HEADERS, H_FOLLOW, TENANT_HEADER, REFUSED_HEADER, H_FIRST_CONTACT, H_RETRY, H_RETRIED, H_FAILOVER,
                       ROLE_METADATA}
    assert {m["remove"] for m in upstream_mutation["typed_config"]["mutations"]["request_mutations"]} == \
        set(ROUTING_HEADERS)
    ext_procs = named(envoy, "envoy.filters.http.ext_proc")
    downstream = [f for f in ext_procs if "metadata_options" in f["typed_config"]]
    assert [f["typed_config"]["metadata_options"]["receiving_namespaces"]["untyped"] for f in downstream] == \
        [[NAMESPACE]]
    upstream = [f["typed_config"]["grpc_service"]["initial_metadata"] for f in ext_procs
                if "initial_metadata" in f["typed_config"]["grpc_service"]]
    assert upstream == [[{"key": ROLE_METADATA, "value": FIRST_CONTACT_ROLE}]]
    original_dst = {c["name"]: c["original_dst_lb_config"] for c in envoy["static_resources"]["clusters"]
                    if c["type"] == "ORIGINAL_DST"}
    assert original_dst.pop("endpoints")["http_header_name"] == H_ENDPOINT
    # a first contact's instance from metadata: its attempts are sent without the header (first_contact.Probe)
    assert original_dst == {"endpoints_first_contact": {"metadata_key": {"key": NAMESPACE, "path": [{"key": "endpoint"}]}}}
    [to_metadata] = named(envoy, "envoy.filters.http.header_to_metadata")
    rules = {r["header"]: r["on_header_present"] for r in to_metadata["typed_config"]["request_rules"]}
    assert rules[H_ENDPOINT] == {"metadata_namespace": NAMESPACE, "key": "endpoint", "type": "STRING"}


def test_the_metadata_filter_runs_on_the_paths_with_fast_routes(envoy):
    """json_to_metadata is skipped except on the create paths of the two APIs, the only ones routed fast."""
    [delegate] = named(envoy, "envoy.filters.http.match_delegate")
    [matcher] = delegate["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    [not_path, _upgrade] = matcher["predicate"]["or_matcher"]["predicate"]
    regex = not_path["not_matcher"]["single_predicate"]["value_match"]["safe_regex"]["regex"]
    for path in PATHS.values():
        assert re.fullmatch(regex, path) and re.fullmatch(regex, path + "?x=1"), path
    for path in ("/v1/responses/compact", "/v1/embeddings", "/v1/responses/resp_1"):
        assert not re.fullmatch(regex, path), path


def test_the_other_paths_model_reader_skips_exactly_the_api_paths(envoy):
    """The allow-list's second model reader runs where the API paths' reader does not: the same regex."""
    [delegate] = named(envoy, "envoy.filters.http.match_delegate.request_model")
    [matcher] = delegate["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    [path, _upgrade] = matcher["predicate"]["or_matcher"]["predicate"]
    assert path["single_predicate"]["value_match"]["safe_regex"]["regex"] == API_PATH_REGEX


def test_envoy_rules_command_prints_the_generated_rules(capsys):
    assert main(["envoy-rules"]) == 0
    first, second = yaml.safe_load_all(capsys.readouterr().out)
    assert first == json_to_metadata_rules()
    assert second == {"response_rules": sse_to_metadata_rules()}


def test_each_local_reply_has_its_messages_twin_first(envoy):
    """Envoy's own replies reach a Messages client in Anthropic's shape: before the OpenAI-shaped mappers,
    one generated twin of each, in the same order (the first match answers)."""
    [hcm] = [h for h in named(envoy, "envoy.filters.network.http_connection_manager")
             if h["typed_config"]["stat_prefix"] == "llm"]  # (not the fast groups' sentinel listener's)
    mappers = hcm["typed_config"]["local_reply_config"]["mappers"]
    openai_shaped = [m for m in mappers if "type" not in m["body_format_override"]["json_format"]]
    assert mappers == [messages_local_reply(m) for m in openai_shaped] + openai_shaped
    assert len(openai_shaped) == 8


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
    (408, "invalid_request_error"), (413, "request_too_large"), (429, "rate_limit_error"), (431, "invalid_request_error"),
    (500, "api_error"), (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"),
    (529, "overloaded_error")])
def test_the_anthropic_type_of_envoys_statuses(status, kind):
    """Anthropic's documented types (its errors page, the SDK's error objects), as the sidecar gives them:
    a 503 (Envoy's for an unreachable upstream) is HTTP's temporary overload, its overloaded_error."""
    assert anthropic_type(status) == kind  # the sidecar's answers: the same table
    branches = dict(re.findall(r"response\.code == (\d+) \? '(\w+)'", ANTHROPIC_TYPE_CEL))
    assert ANTHROPIC_TYPE_CEL.endswith("response.code >= 500 ? 'api_error' : 'invalid_request_error'")
    fallback = "api_error" if status >= 500 else "invalid_request_error"
    assert branches.get(str(status), fallback) == kind


def test_a_messages_twin_asks_for_the_path_the_client_sent():
    twin = messages_local_reply({"filter": {"extension_filter": {"name": "cel", "typed_config": {
        "@type": "t", "expression": "response.code == 504"}}}, "status_code": 504,
        "body_format_override": {"json_format": {"error": {"message": "slow", "type": "gateway_error"}}}})
    assert twin == {"filter": {"extension_filter": {"name": "cel", "typed_config": {"@type": "t", "expression":
                    "(('x-envoy-original-path' in request.headers) ? request.headers['x-envoy-original-path'] "
                    ": request.path).startsWith('/v1/messages') && (response.code == 504)"}}}, "status_code": 504,
                    "body_format_override": {"json_format": {"type": "error", "error": {
                        "type": f"%CEL({ANTHROPIC_TYPE_CEL})%", "message": "slow"}}}}
