"""Hosted providers by `url:`: what the config accepts and refuses, and the cluster and secret compiled
for Envoy (TLS with SNI and the name checked, the trust store, the key only in a secret)."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from extproc.api import CHAT
from extproc.config import ConfigError, parse_config
from extproc.routing.classify import Classifier
from extproc.routing.compile import compile_routes, decide
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def config(entry: str, env: dict[str, str] | None = None):
    return parse_config(f"backends:\n  - name: p\n    api: chat\n    models: [\"m-*\"]\n{entry}", env=env or {})


def problems(entry: str) -> str:
    with pytest.raises(ConfigError) as e:
        config(entry)
    return str(e.value)


def test_a_url_gives_host_port_and_path_prefix():
    b = config("    url: https://openrouter.ai:8443/api/\n").backends[0]
    assert b.hosted is not None
    assert (b.hosted.scheme, b.hosted.host, b.hosted.port, b.path_prefix) == ("https", "openrouter.ai", 8443, "/api")
    assert config("    url: https://api.openai.com\n").backends[0].hosted.port == 443  # type: ignore[union-attr]


@pytest.mark.parametrize(("entry", "says"), [
    ("    url: ftp://api.openai.com\n", "must be https://host"),
    ("    url: https://user:pw@api.openai.com\n", "without credentials"),
    ("    url: https://api.openai.com/v1?x=1\n", "without credentials, query"),
    ("    url: https://api.openai.com/api\n    path_prefix: /api\n", "the url's path is the prefix already"),
    ("    url: https://a.example\n    endpoints: [\"127.0.0.1:1\"]\n", "give exactly one of"),
    ("    endpoints: [\"127.0.0.1:1\"]\n    ca_file: /x\n", "only for a backend given by 'url'"),
    ("    url: https://a.example\n    ca_file: /nonexistent/ca.pem\n", "cannot read /nonexistent/ca.pem"),
    ("    url: https://a.example\n    headers: {Authorization: x}\n", "not a header name a provider extra may set"),
    ("    url: https://a.example\n    provider: nobody\n", "must be one of"),
    ("    url: https://a.example\n    api_version: '2024-10-21'\n", "provider openai has no versioned paths"),
    ("    url: https://a.example\n    api_key_env: K\n    api_key_file: /k\n", "give one of api_key_env and api_key_file"),
])
def test_what_a_url_backend_may_not_say(entry, says):
    assert says in problems(entry)


def test_the_compiled_cluster_verifies_the_providers_name_against_the_ca_file(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text(PEM)
    cfg = config(f"    url: https://api.openai.com\n    ca_file: {ca}\n    api_key_env: K\n"
                 "    headers: {HTTP-Referer: https://me.example}\n", env={"K": "sk-1"})
    compiled = compile_routes(cfg, Knowledge(), {})
    cluster = next(c for c in compiled.clusters if c.name == "llm.p")
    assert cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address == "api.openai.com"
    tls = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "api.openai.com"
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.inline_string == PEM  # the bundle replaces the system store
    assert [m.matcher.exact for m in validation.match_typed_subject_alt_names] == ["api.openai.com"]
    assert list(tls.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    opts = hpo.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
    assert opts.HasField("auto_config")
    names = [f.name for f in opts.http_filters]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.credential_injector",
                     "envoy.filters.http.upstream_codec"]
    mutation = header_mutation_pb2.HeaderMutation()
    opts.http_filters[0].typed_config.Unpack(mutation)
    rules = mutation.mutations.request_mutations
    assert [r.remove for r in rules[:1]] == ["authorization"]  # the client's own key never goes with ours
    assert (rules[1].append.header.key, rules[1].append.header.value) == ("http-referer", "https://me.example")
    injector = credential_injector_pb2.CredentialInjector()
    opts.http_filters[1].typed_config.Unpack(injector)
    generic = generic_pb2.Generic()
    injector.credential.typed_config.Unpack(generic)
    assert (generic.credential.name, generic.header, injector.overwrite) == ("key.p", "authorization", True)
    assert [(s.name, s.generic_secret.secret.inline_string) for s in compiled.secrets] == [("key.p", "Bearer sk-1")]
    assert "sk-1" not in str(compiled.clusters) + str(compiled.routes)  # only the secret holds it


def test_the_system_trust_store_without_a_ca_file_and_no_key_no_secret():
    compiled = compile_routes(config("    url: https://api.openai.com\n"), Knowledge(), {})
    tls = tls_pb2.UpstreamTlsContext()
    next(c for c in compiled.clusters if c.name == "llm.p").transport_socket.typed_config.Unpack(tls)
    assert tls.common_tls_context.validation_context.trusted_ca.filename == "/etc/ssl/certs/ca-certificates.crt"
    assert compiled.secrets == []


def test_a_keyed_url_backend_takes_the_fast_path_and_a_keyed_endpoints_backend_does_not():
    for entry, fast in (("    url: https://api.openai.com\n    api_key_env: K\n", True),
                        ("    endpoints: [\"127.0.0.1:9\"]\n    api_key_env: K\n", False)):
        cfg = config(entry, env={"K": "sk-1"})
        assert decide(cfg, Classifier(cfg).resolve("m-1"), CHAT).fast is fast


def test_the_processor_path_names_the_compiled_cluster_and_leaves_the_key_to_envoy():
    """Envoy holds a url: backend's key (an SDS secret in the provider's header form) and its cluster adds
    it on every path: the processor names the cluster and sends no key of its own."""
    cfg = config("    url: https://x.openai.azure.com\n    provider: azure\n    api_key_env: K\n", env={"K": "az-1"})
    target = Gateway(cfg).target(cfg.backends[0], "k")
    assert dict(target.headers()) == {"x-gateway-backend": "p", "x-gateway-cluster": "llm.p"}
    assert [s.generic_secret.secret.inline_string for s in compile_routes(cfg, Knowledge(), {}).secrets] == ["az-1"]


def test_anthropic_is_a_provider_row_whose_key_envoy_holds_as_x_api_key():
    """A url: backend of Anthropic's: Envoy injects its key as x-api-key (removing the client's `authorization`
    and `x-api-key`); the processor sends only the API's version; it serves Messages only."""
    cfg = parse_config("backends:\n  - name: p\n    api: messages\n    models: [\"claude-*\"]\n"
                       "    url: https://api.anthropic.com\n    provider: anthropic\n    api_key_env: K\n",
                       env={"K": "sk-ant-1"})
    compiled = compile_routes(cfg, Knowledge(), {})
    assert [s.generic_secret.secret.inline_string for s in compiled.secrets] == ["sk-ant-1"]
    opts = hpo.HttpProtocolOptions()
    next(c for c in compiled.clusters if c.name == "llm.p").typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
    mutation, injector, generic = header_mutation_pb2.HeaderMutation(), credential_injector_pb2.CredentialInjector(), \
        generic_pb2.Generic()
    opts.http_filters[0].typed_config.Unpack(mutation)
    opts.http_filters[1].typed_config.Unpack(injector)
    injector.credential.typed_config.Unpack(generic)
    assert [r.remove for r in mutation.mutations.request_mutations] == ["authorization", "x-api-key"]
    assert generic.header == "x-api-key"
    target = Gateway(cfg).target(cfg.backends[0], "k")
    assert dict(target.headers("messages")) == {"x-gateway-backend": "p", "x-gateway-cluster": "llm.p",
                                                "anthropic-version": "2023-06-01"}
    assert target.foreign_credentials("messages") == ()  # Envoy removes both
    assert "provider anthropic serves messages only" in problems("    url: https://api.anthropic.com\n"
                                                                 "    provider: anthropic\n")


def test_a_key_file_is_read_and_a_missing_one_is_a_warning(tmp_path: Path):
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    assert config(f"    url: https://a.example\n    api_key_file: {key}\n").backends[0].api_key == "sk-file"
    cfg = config(f"    url: https://a.example\n    api_key_file: {tmp_path / 'none'}\n")
    assert cfg.backends[0].unserved() is not None and "missing or empty" in cfg.warnings[0]


AZURE = ("    url: https://contoso.openai.azure.com\n    provider: azure\n    api_version: '2024-10-21'\n"
         "    deployments: {gpt-4o: prod 4o}\n")


@pytest.mark.parametrize(("entry", "path", "model", "sent"), [
    (AZURE, "/v1/chat/completions", "gpt-4o", "/openai/deployments/prod%204o/chat/completions?api-version=2024-10-21"),
    (AZURE, "/v1/chat/completions", "m-mini", "/openai/deployments/m-mini/chat/completions?api-version=2024-10-21"),
    (AZURE, "/v1/responses?x=1", "gpt-4o", "/openai/responses?api-version=2024-10-21&x=1"),
    (AZURE, "/v1/responses/resp_1", None, "/openai/responses/resp_1?api-version=2024-10-21"),
    ("    url: https://contoso.openai.azure.com\n    provider: azure\n", "/v1/responses", "m", "/openai/v1/responses"),
    ("    url: https://openrouter.ai/api\n", "/v1/chat/completions", "m", "/api/v1/chat/completions"),
])
def test_the_upstream_path_of_each_provider_shape(entry, path, model, sent):
    from extproc.routing.providers import upstream_path

    assert upstream_path(config(entry).backends[0], path, model) == sent


def test_a_mapped_model_is_sent_as_its_deployment_and_keeps_the_processor():
    from extproc.routing.providers import with_deployment

    b = config(AZURE).backends[0]
    assert with_deployment(b, None, {"model": "gpt-4o", "messages": []}) == {"model": "prod 4o", "messages": []}
    assert with_deployment(b, None, {"model": "m-1"}) is None  # its own name: the bytes go as they are
    cfg = config(AZURE)
    assert not decide(cfg, Classifier(cfg).resolve("m-1"), CHAT).fast
