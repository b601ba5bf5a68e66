"""Hosted providers' Envoy clusters and the keys Envoy holds for them (sans-IO, pure).

A `url:` backend becomes one cluster: the host looked up by DNS, TLS with SNI and the certificate's
name checked against the system trust store or the backend's `ca_file`, HTTP/2 where the provider
offers it (ALPN), connect and idle timeouts. A backend with a key gets it as an SDS secret, served
over the same ADS stream, and the cluster's upstream filters put it on every request to it: the key
is in Envoy's secret store (shown redacted in `/config_dump`), never in a route or cluster, so such
backends take the fast path too. The provider table says which header carries it.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from extproc.config import Backend, Config, Hosted
from extproc.envoy.names import FIRST_CONTACT_ROLE, ROLE_METADATA
from extproc.routing.gateway import Target, backend_cluster
from extproc.routing.providers import credential_header, envoy_holds_key, provider_of

# The system trust store as the Envoy image (and Debian, Ubuntu) has it: Envoy reads it, not the sidecar.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CONNECT_TIMEOUT_SECONDS = 10
IDLE_TIMEOUT_SECONDS = 300  # an upstream connection unused this long is closed (providers drop them anyway)
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def lb_endpoint(address: str, weight: int) -> endpoint_components_pb2.LbEndpoint:
    """One `host:port` instance of a compiled cluster (a backend's own, or a group's priority)."""
    host, _, port = address.rpartition(":")
    sock = address_pb2.SocketAddress(address=host.strip("[]"), port_value=int(port))
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(socket_address=sock)),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight))


def _any(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)  # type: ignore[arg-type]
    return out


def secret_name(backend: Backend) -> str:
    return f"key.{backend.name}"


def secrets(config: Config) -> list[secret_pb2.Secret]:
    """Each key Envoy holds, as the header value its provider wants."""
    out = []
    for b in config.backends:
        cred = credential_header(b)
        if envoy_holds_key(b) and cred is not None:
            out.append(secret_pb2.Secret(name=secret_name(b), generic_secret=secret_pb2.GenericSecret(
                secret=base_pb2.DataSource(inline_string=cred[1]))))
    return out


def _filter(name: str, config: object) -> hcm.HttpFilter:
    return hcm.HttpFilter(name=name, typed_config=_any(config))


def first_contact_cluster(backend: Backend) -> str | None:
    """The cluster of a first contact with a model of unknown API at a `url:` backend: its own, with the
    processor watching each attempt (None: the backend has none, its paths are not plain prefixes)."""
    hosted = backend.hosted
    if hosted is None or hosted.api_version is not None:
        return None
    return f"first-contact.{backend_cluster(backend)}"  # never a backend's own (those start with llm.)


def upstream_processor(role: str = FIRST_CONTACT_ROLE, attributes: tuple[str, ...] = ()) -> hcm.HttpFilter:
    """The processor as an upstream filter (of a first contact, or of a model group's attempts): as in
    deploy/envoy.yaml's endpoints_first_contact cluster (role metadata, timeouts, buffered request,
    routing mutations), with the CEL `attributes` it is sent with each request."""
    mode = processing_mode_pb2.ProcessingMode
    return _filter("envoy.filters.http.ext_proc", ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="extproc"),
            timeout=duration_pb2.Duration(seconds=30),
            initial_metadata=[base_pb2.HeaderValue(key=ROLE_METADATA, value=role)]),
        request_attributes=attributes,
        failure_mode_allow=False, allow_mode_override=True, message_timeout=duration_pb2.Duration(seconds=30),
        max_message_timeout=duration_pb2.Duration(seconds=600),
        processing_mode=mode(request_header_mode=mode.SEND, request_body_mode=mode.BUFFERED,
                             response_header_mode=mode.SEND, response_body_mode=mode.NONE),
        mutation_rules=mutation_rules_pb2.HeaderMutationRules(allow_all_routing=wrappers_pb2.BoolValue(value=True),
                                                          allow_envoy=wrappers_pb2.BoolValue(value=False))))


def upstream_filters(backend: Backend, first_contact: bool = False) -> list[hcm.HttpFilter]:
    """The cluster's own filters: at a first contact the processor first (it may translate the retry),
    then the provider extras, and the key in place of whatever the client sent."""
    hosted = backend.hosted
    assert hosted is not None
    mutations = [mutation_rules_pb2.HeaderMutation(append=base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=k, value=v), append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
        for k, v in hosted.headers]
    out = [upstream_processor()] if first_contact else []
    if envoy_holds_key(backend):  # the client's own credentials never reach the provider with the gateway's key
        auth = provider_of(hosted.provider).auth_header
        mutations[:0] = [mutation_rules_pb2.HeaderMutation(remove=h) for h in dict.fromkeys(("authorization", auth))]
    if mutations:
        out.append(_filter("envoy.filters.http.header_mutation", header_mutation_pb2.HeaderMutation(
            mutations=header_mutation_pb2.Mutations(request_mutations=mutations))))
    if envoy_holds_key(backend):
        sds = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                             resource_api_version=config_source_pb2.V3)
        generic = generic_pb2.Generic(credential=secret_pb2.SdsSecretConfig(name=secret_name(backend), sds_config=sds),
                                      header=provider_of(hosted.provider).auth_header)
        out.append(_filter("envoy.filters.http.credential_injector", credential_injector_pb2.CredentialInjector(
            overwrite=True, credential=extension_pb2.TypedExtensionConfig(
                name="envoy.http.injected_credentials.generic", typed_config=_any(generic)))))
    if out:
        out.append(_filter("envoy.filters.http.upstream_codec", upstream_codec_pb2.UpstreamCodec()))
    return out


def _protocol_options(backend: Backend, hosted: Hosted, first_contact: bool) -> hpo.HttpProtocolOptions:
    common = protocol_pb2.HttpProtocolOptions(idle_timeout=duration_pb2.Duration(seconds=IDLE_TIMEOUT_SECONDS))
    opts = hpo.HttpProtocolOptions(common_http_protocol_options=common,
                                   http_filters=upstream_filters(backend, first_contact))
    if hosted.scheme == "https":  # HTTP/2 when the provider's TLS offers it, else HTTP/1.1
        opts.auto_config.CopyFrom(hpo.HttpProtocolOptions.AutoHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    else:
        opts.explicit_http_config.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
    return opts


def tls_socket(hosted: Hosted, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> base_pb2.TransportSocket:
    """TLS that sends the key only to a server proving the provider's name, by the trust store given;
    `alpn` what the cluster's codec can speak (a model group's cluster speaks HTTP/1.1 to every member)."""
    ca = base_pb2.DataSource(filename=SYSTEM_CA_BUNDLE) if hosted.ca_pem is None else \
        base_pb2.DataSource(inline_string=hosted.ca_pem)  # read by the sidecar: only it needs the file
    context = tls_pb2.UpstreamTlsContext(sni=hosted.host, common_tls_context=tls_pb2.CommonTlsContext(
        alpn_protocols=alpn, validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=ca, match_typed_subject_alt_names=[common_pb2.SubjectAltNameMatcher(
                san_type=common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=hosted.host))])))
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(context))


def hosted_clusters(backend: Backend) -> list[cluster_pb2.Cluster]:
    """The provider's cluster, and its first-contact twin when it has one."""
    out = [_hosted_cluster(backend, backend_cluster(backend), first_contact=False)]
    if (twin := first_contact_cluster(backend)) is not None:
        out.append(_hosted_cluster(backend, twin, first_contact=True))
    return out


def _hosted_cluster(backend: Backend, name: str, first_contact: bool) -> cluster_pb2.Cluster:
    """The provider's cluster: one DNS name, followed as it changes (LOGICAL_DNS)."""
    hosted = backend.hosted
    assert hosted is not None
    sock = address_pb2.SocketAddress(address=hosted.host, port_value=hosted.port)
    cluster = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.LOGICAL_DNS, dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_SECONDS),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(socket_address=sock)))])]))
    cluster.typed_extension_protocol_options[PROTOCOL_OPTIONS].CopyFrom(_any(_protocol_options(backend, hosted, first_contact)))
    if hosted.scheme == "https":
        cluster.transport_socket.CopyFrom(tls_socket(hosted))
    return cluster


def describe(backend: Backend) -> str:
    """The compiled target in words, for `check-config` and `extproc resolve`."""
    hosted = backend.hosted
    if hosted is None:
        return f"Envoy cluster {backend.cluster}" if backend.cluster else \
            f"{len(backend.endpoints)} instance(s), cluster {backend_cluster(backend)}"
    trust = f"ca_file {hosted.ca_file}" if hosted.ca_file else f"the system trust store ({SYSTEM_CA_BUNDLE})"
    tls = f"TLS to {hosted.host} (SNI and certificate name checked against {trust}), HTTP/2 if offered" \
        if hosted.scheme == "https" else "plain HTTP/1.1 (no TLS)"
    key = "no key" if not backend.keyed else \
        f"key in Envoy's secret {secret_name(backend)} as {provider_of(hosted.provider).auth_header}" \
        if backend.api_key else "key not set (503 backend_unconfigured)"
    extras = f", headers {', '.join(k for k, _ in hosted.headers)}" if hosted.headers else ""
    return (f"cluster {backend_cluster(backend)}: {hosted.scheme}://{hosted.authority}{backend.path_prefix} "
            f"(provider {hosted.provider}), {tls}, {key}{extras}")


def first_contact_ready(target: Target) -> bool:
    """Envoy can retry a first contact to this target on the other API: an instance of an `endpoints`
    backend (the static endpoints_first_contact cluster), or a `url:` backend with a twin cluster."""
    return target.endpoint is not None or first_contact_cluster(target.backend) is not None
