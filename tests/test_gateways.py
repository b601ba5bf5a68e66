"""deploy/gateways: the sidecar attached to an Envoy Gateway or an Istio ingress gateway.

Each custom resource is validated against its project's published CRD schema (the openAPIV3Schema of
the CRD files in envoyproxy/gateway and istio/istio, kept as test data with their licence); the core
resources against the Kubernetes schemas; the ext_proc settings against deploy/envoy.yaml's, so an
attached sidecar gets the same processing modes, timeouts and failure mode; and the raw Envoy config
inside the EnvoyFilter (opaque to its CRD) through `envoy --mode validate`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from extproc.local.stack import ENVOY_YAML, REPO, find_envoy
from extproc.routing.gateway import H_BACKEND, H_ENDPOINT

GATEWAYS = REPO / "deploy" / "gateways"
# Where the CRD schemas are kept: tests/data/crds, or shared/reference/crds beside the repo.
CRD_DIRS = [Path(p) for p in (os.environ.get("EXTPROC_CRD_DIR"),) if p] + [
    REPO / "tests" / "data" / "crds", REPO.parent / "shared" / "reference" / "crds"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((GATEWAYS / name).read_text()) if d]


def _crd_dir() -> Path:
    for d in CRD_DIRS:
        if (d / "README.md").exists():
            return d
    pytest.skip(f"no CRD schemas in {', '.join(map(str, CRD_DIRS))}")


def _envoy_yaml_ext_proc() -> tuple[dict, dict]:
    """deploy/envoy.yaml's ext_proc filter config and its ORIGINAL_DST cluster."""
    doc = yaml.safe_load(ENVOY_YAML.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["type"] == "ORIGINAL_DST")
    return ext_proc, cluster


def strict(schema: dict) -> dict:
    """The schema as `kubectl apply --validate=strict` reads it: an object's unknown fields are errors
    (Kubernetes would otherwise drop them silently), unless the schema preserves them."""
    out = {k: strict(v) if isinstance(v, dict) else [strict(x) if isinstance(x, dict) else x for x in v]
           if isinstance(v, list) else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    return out


def _schema(crds: Path, name: str) -> dict:
    """A CRD's schema for a whole object: the API server's own fields (which Istio's CRDs leave out) too."""
    root = strict(json.loads((crds / name).read_text()))
    root["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                          **root["properties"]}
    return root


CUSTOM = [(name, i) for name in ("envoy-gateway.yaml", "istio.yaml") for i in range(len(_docs(name)))]


@pytest.mark.parametrize(("name", "index"), CUSTOM, ids=[f"{n}-{_docs(n)[i]['kind']}" for n, i in CUSTOM])
def test_custom_resources_follow_their_published_crd_schemas(name, index):
    doc = _docs(name)[index]
    group, version = doc["apiVersion"].split("/")
    crds, name = _crd_dir(), f"{group}_{version}_{doc['kind']}.json"
    assert (crds / name).exists(), f"no schema for {doc['apiVersion']} {doc['kind']} in {crds}"
    jsonschema.validate(doc, _schema(crds, name))


def test_the_schemas_refuse_what_their_projects_refuse():
    """The schemas do bite: a processing mode Envoy Gateway does not know, an Istio patch operation."""
    crds = _crd_dir()
    policy = copy.deepcopy(_docs("envoy-gateway.yaml")[0])
    policy["spec"]["extProc"][0]["processingMode"]["request"]["body"] = "BUFFERED"  # Envoy's spelling, not EG's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(policy, _schema(crds, "gateway.envoyproxy.io_v1alpha1_EnvoyExtensionPolicy.json"))
    envoy_filter = copy.deepcopy(_docs("istio.yaml")[0])
    envoy_filter["spec"]["configPatches"][0]["patch"]["operation"] = "PREPEND"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(envoy_filter, _schema(crds, "networking.istio.io_v1alpha3_EnvoyFilter.json"))
    route = copy.deepcopy(_docs("envoy-gateway.yaml")[1])
    route["spec"]["rules"][0]["timeout"] = "600s"  # a misspelt field: Kubernetes would drop it unseen
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, _schema(crds, "gateway.networking.k8s.io_v1_HTTPRoute.json"))


def test_sidecar_deployment_validates_against_kubernetes():
    import kubernetes_validate

    for doc in _docs("sidecar.yaml"):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_envoy_gateway_policy_has_deploy_envoys_processing():
    """Envoy Gateway's ExtProc fields, read as its API documents them, give deploy/envoy.yaml's filter."""
    ext_proc, _ = _envoy_yaml_ext_proc()
    (policy,) = [d for d in _docs("envoy-gateway.yaml") if d["kind"] == "EnvoyExtensionPolicy"]
    (ep,) = policy["spec"]["extProc"]
    mode = ep["processingMode"]
    bodies = {"Buffered": "BUFFERED", "Streamed": "STREAMED"}
    as_envoy = {  # request/response present: their headers are sent; a body mode only when named
        "request_header_mode": "SEND" if "request" in mode else "SKIP",
        "request_body_mode": bodies.get(mode.get("request", {}).get("body"), "NONE"),
        "response_header_mode": "SEND" if "response" in mode else "SKIP",
        "response_body_mode": bodies.get(mode.get("response", {}).get("body"), "NONE"),
    }
    assert as_envoy == ext_proc["processing_mode"]
    assert mode["allowModeOverride"] is ext_proc["allow_mode_override"]
    assert ep["failOpen"] is ext_proc["failure_mode_allow"] is False
    assert ep["messageTimeout"] == ext_proc["message_timeout"]
    assert ep["metadata"]["writableNamespaces"] == ext_proc["metadata_options"]["receiving_namespaces"]["untyped"]
    assert policy["spec"]["targetRefs"][0]["kind"] == "HTTPRoute"  # not the whole Gateway


def test_envoy_gateway_routes_follow_the_sidecars_headers():
    (route,) = [d for d in _docs("envoy-gateway.yaml") if d["kind"] == "HTTPRoute"]
    *by_backend, fallback = route["spec"]["rules"]
    for rule in by_backend:
        (match,) = rule["matches"]
        assert [h["name"] for h in match["headers"]] == [H_BACKEND]
        assert rule["backendRefs"]
    (match,) = fallback["matches"]
    assert "headers" not in match  # the catch-all that enables the processor before routing
    (filt,) = fallback["filters"]
    (direct,) = [d for d in _docs("envoy-gateway.yaml") if d["kind"] == "HTTPRouteFilter"]
    assert filt["extensionRef"]["name"] == direct["metadata"]["name"]
    assert json.loads(direct["spec"]["directResponse"]["body"]["inline"])["error"]["code"] == "no_route"


def _istio_patches() -> dict[str, dict]:
    (envoy_filter,) = [d for d in _docs("istio.yaml") if d["kind"] == "EnvoyFilter"]
    return {p["applyTo"]: p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"]}


def test_istio_filter_is_deploy_envoys_ext_proc():
    ext_proc, cluster = _envoy_yaml_ext_proc()
    patches = _istio_patches()
    filt = patches["HTTP_FILTER"]["typed_config"]
    assert filt["grpc_service"]["envoy_grpc"]["cluster_name"].startswith("outbound|50051||llm-bridge-extproc.")
    same = lambda d: {**d, "grpc_service": {**d["grpc_service"], "envoy_grpc": None}}  # noqa: E731
    assert same(filt) == same(ext_proc)
    assert {**patches["CLUSTER"], "name": None} == {**cluster, "name": None}
    assert patches["CLUSTER"]["original_dst_lb_config"]["http_header_name"] == H_ENDPOINT
    assert patches["HTTP_ROUTE"]["match"]["headers"] == [{"name": H_ENDPOINT, "present_match": True}]
    assert patches["HTTP_ROUTE"]["route"]["cluster"] == patches["CLUSTER"]["name"]
    (vs,) = [d for d in _docs("istio.yaml") if d["kind"] == "VirtualService"]
    *by_backend, fallback = vs["spec"]["http"]
    assert all(list(r["match"][0]["headers"]) == [H_BACKEND] for r in by_backend)
    assert fallback["directResponse"]["status"] == 404 and "match" not in fallback


def test_istio_patches_are_valid_envoy_config(tmp_path):
    """The EnvoyFilter's values as Envoy would get them: filter, cluster and route in one bootstrap."""
    patches = _istio_patches()
    grpc_cluster = patches["HTTP_FILTER"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    bootstrap = {
        "static_resources": {
            "listeners": [{"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "gateway",
                                   "route_config": {"virtual_hosts": [{"name": "llm", "domains": ["llm.example.com"],
                                                                       "routes": [patches["HTTP_ROUTE"]]}]},
                                   "http_filters": [patches["HTTP_FILTER"], {
                                       "name": "envoy.filters.http.router", "typed_config": {
                                           "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                               }}]}]}],
            "clusters": [patches["CLUSTER"], {
                "name": grpc_cluster, "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": grpc_cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 50051}}}}]}]}}],
        }}
    cfg = tmp_path / "istio-gateway.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap))
    out = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
