"""deploy/gateways: the sidecar attached to an Envoy Gateway or an Istio ingress gateway.

The Gateway API and Istio resources are validated with the npm packages @kubernetes-models/gateway-api
and @kubernetes-models/istio (models generated from those projects' published types and CRDs, which
scripts/test.sh installs into .tools): their JSON-schema validators check enums, patterns and limits,
and TypeScript checks the manifest against their interfaces, so an unknown or misspelt field is an error
as `kubectl apply --validate=strict` makes it. Envoy Gateway's own resources are on no registry: they
are validated against its CRD schema files where those are present (../shared/reference/crds), and
their ext_proc settings always against deploy/envoy.yaml's, so an attached sidecar gets the same
processing modes, timeouts and failure mode; the core resources against the Kubernetes schemas; and the
raw Envoy config inside the EnvoyFilter (opaque to its CRD) through `envoy --mode validate`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from extproc.envoy.names import H_BACKEND, H_ENDPOINT
from extproc.local.stack import ENVOY_YAML, REPO, find_envoy

GATEWAYS = REPO / "deploy" / "gateways"
# Where Envoy Gateway's CRD schemas may be kept: tests/data/crds, or shared/reference/crds beside the repo.
CRD_DIRS = [Path(p) for p in (os.environ.get("EXTPROC_CRD_DIR"),) if p] + [
    REPO / "tests" / "data" / "crds", REPO.parent / "shared" / "reference" / "crds"]
ENVOY_GATEWAY = "gateway.envoyproxy.io"
# The npm packages whose models cover an API group (installed by scripts/test.sh into .tools).
NODE_MODULES = REPO / ".tools" / "node_modules"
MODEL_PACKAGES = {"gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
                  "networking.istio.io": "@kubernetes-models/istio"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((GATEWAYS / name).read_text()) if d]


def _crd_dir() -> Path:
    for d in CRD_DIRS:
        if (d / "README.md").exists():
            return d
    pytest.skip("Envoy Gateway's CRD schemas are on no package registry: put its openAPIV3Schema files "
                "(gateway.envoyproxy.io_v1alpha1_<Kind>.json, with a README.md naming their source) in "
                f"../shared/reference/crds to validate its resources; looked in {', '.join(map(str, CRD_DIRS))}")


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
    """A CRD's schema for a whole object: the API server's own fields (which CRD schemas may leave out) too."""
    root = strict(json.loads((crds / name).read_text()))
    root["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                          **root["properties"]}
    return root


CUSTOM = [d for name in ("envoy-gateway.yaml", "istio.yaml") for d in _docs(name)]
BY_MODELS = [d for d in CUSTOM if d["apiVersion"].split("/")[0] in MODEL_PACKAGES]
BY_CRD_FILES = [d for d in CUSTOM if d["apiVersion"].split("/")[0] == ENVOY_GATEWAY]


def test_every_custom_resource_has_a_validator():
    assert sorted(d["kind"] for d in BY_MODELS + BY_CRD_FILES) == sorted(d["kind"] for d in CUSTOM)
    assert {d["kind"] for d in BY_MODELS} == {"HTTPRoute", "EnvoyFilter", "VirtualService"}


def _node_models() -> Path:
    node = shutil.which("node")
    tsc = NODE_MODULES / ".bin" / "tsc"
    if node is None or not tsc.exists() or not all((NODE_MODULES / p).is_dir() for p in MODEL_PACKAGES.values()):
        pytest.skip(f"the Gateway API and Istio models need node and the npm packages "
                    f"{', '.join(MODEL_PACKAGES.values())} and typescript in {NODE_MODULES} "
                    "(scripts/test.sh installs them with npm)")
    return NODE_MODULES


def _model(doc: dict) -> tuple[str, str]:
    """The npm module and class of a resource's model: <package>/<group>/<version>/<Kind>."""
    return f"{MODEL_PACKAGES[doc['apiVersion'].split('/')[0]]}/{doc['apiVersion']}/{doc['kind']}", doc["kind"]


# Validates each document of stdin's JSON list with its model's JSON-schema validator; prints the errors.
VALIDATE_JS = """
import fs from "node:fs";
import path from "node:path";
const [nm, ...modules] = process.argv.slice(1);
const docs = JSON.parse(fs.readFileSync(0, "utf8"));
const errors = [];
for (const [i, doc] of docs.entries()) {
  const model = (await import(path.join(nm, modules[i] + ".js")))[doc.kind];
  try { new model(doc).validate(); errors.push(null); } catch (e) { errors.push(e.message); }
}
console.log(JSON.stringify(errors));
"""


def model_schema_errors(docs: list[dict]) -> list[str | None]:
    """Each document's errors from its model's JSON-schema validator (enums, patterns, limits), or None."""
    nm = _node_models()
    out = subprocess.run(["node", "--input-type=module", "-e", VALIDATE_JS, str(nm), *(_model(d)[0] for d in docs)],
                         input=json.dumps(docs), capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def model_type_errors(docs: list[dict], tmp_path: Path) -> list[list[str]]:
    """Each document's TypeScript errors against its model's interface: `satisfies` on an object literal
    makes every field the interface does not declare an error (Kubernetes would drop it unseen)."""
    nm = _node_models()
    lines = [f'import type {{ I{kind} as T{i} }} from "{module}";' for i, (module, kind) in enumerate(map(_model, docs))]
    first = len(lines) + 1
    lines += [f"export const doc{i} = {json.dumps(d)} satisfies T{i};" for i, d in enumerate(docs)]
    (tmp_path / "manifests.ts").write_text("\n".join(lines) + "\n")
    (tmp_path / "tsconfig.json").write_text(json.dumps({"files": ["manifests.ts"], "compilerOptions": {
        "strict": True, "noEmit": True, "skipLibCheck": True, "types": [], "module": "esnext",
        "moduleResolution": "bundler", "paths": {"*": [f"{nm}/*"]}}}))
    out = subprocess.run([str(nm / ".bin" / "tsc"), "-p", "tsconfig.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    errors: list[list[str]] = [[] for _ in docs]
    for m in re.finditer(r"^manifests\.ts\((\d+),\d+\): (error .*)$", out.stdout, re.M):
        errors[int(m[1]) - first].append(m[2])
    assert out.returncode == 0 or any(errors), out.stdout + out.stderr  # no error tsc failed to place
    return errors


def test_gateway_api_and_istio_resources_follow_their_models(tmp_path):
    assert model_schema_errors(BY_MODELS) == [None] * len(BY_MODELS)
    assert model_type_errors(BY_MODELS, tmp_path) == [[]] * len(BY_MODELS)


def _broken(kind: str, path: list[str | int], value: object) -> dict:
    """A copy of the manifest of that kind with one field set (or added) at path."""
    (doc,) = copy.deepcopy([d for d in CUSTOM if d["kind"] == kind])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def test_the_models_refuse_what_their_projects_refuse(tmp_path):
    """The validators do bite: a value out of a field's pattern, enum or type, and an unknown field."""
    bad_values = [
        ("HTTPRoute", ["spec", "hostnames", 0], "LLM_example.com"),  # not a DNS name
        ("EnvoyFilter", ["spec", "configPatches", 0, "patch", "operation"], "PREPEND"),
        ("VirtualService", ["spec", "http", 1, "directResponse", "status"], "404"),
    ]
    errors = model_schema_errors([_broken(*b) for b in bad_values])
    assert [(e or "").startswith("data/" + "/".join(map(str, path)) + " must")
            for (_, path, _), e in zip(bad_values, errors, strict=True)] == [True] * 3, errors
    unknown_fields = [
        ("HTTPRoute", ["spec", "rules", 0, "timeout"], "600s"),  # the field is `timeouts`
        ("EnvoyFilter", ["spec", "configPatches", 2, "match", "routeConfiguration", "vhost", "domain_name"],
         "llm.example.com"),  # the CRD's spelling is domainName
        ("VirtualService", ["spec", "http", 0, "timeouts"], "600s"),  # the field is `timeout`
    ]
    errors = model_type_errors([_broken(*u) for u in unknown_fields], tmp_path)
    assert [[f"'\"{path[-1]}\"' does not exist" in e for e in errs]
            for (_, path, _), errs in zip(unknown_fields, errors, strict=True)] == [[True]] * 3, errors


@pytest.mark.parametrize("doc", BY_CRD_FILES, ids=[d["kind"] for d in BY_CRD_FILES])
def test_envoy_gateway_resources_follow_its_crd_schemas(doc):
    group, version = doc["apiVersion"].split("/")
    crds, name = _crd_dir(), f"{group}_{version}_{doc['kind']}.json"
    assert (crds / name).exists(), f"no schema for {doc['apiVersion']} {doc['kind']} in {crds}"
    jsonschema.validate(doc, _schema(crds, name))


def test_envoy_gateways_schemas_refuse_what_it_refuses():
    """The schema does bite: a processing mode Envoy Gateway does not know."""
    crds = _crd_dir()
    policy = _broken("EnvoyExtensionPolicy", ["spec", "extProc", 0, "processingMode", "request", "body"], "BUFFERED")
    with pytest.raises(jsonschema.ValidationError):  # Envoy's spelling, not Envoy Gateway's
        jsonschema.validate(policy, _schema(crds, "gateway.envoyproxy.io_v1alpha1_EnvoyExtensionPolicy.json"))


def test_sidecar_deployment_validates_against_kubernetes():
    import kubernetes_validate

    for doc in _docs("sidecar.yaml"):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def assert_policy_has_deploy_envoys_processing(policy: dict) -> None:
    """Envoy Gateway's ExtProc fields, read as its API documents them, give deploy/envoy.yaml's filter."""
    ext_proc, _ = _envoy_yaml_ext_proc()
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


def test_envoy_gateway_policy_has_deploy_envoys_processing():
    (policy,) = [d for d in CUSTOM if d["kind"] == "EnvoyExtensionPolicy"]
    assert_policy_has_deploy_envoys_processing(policy)
    mode = ["spec", "extProc", 0, "processingMode"]
    for broken in (_broken("EnvoyExtensionPolicy", [*mode, "response", "body"], "Streamed"),
                   _broken("EnvoyExtensionPolicy", [*mode, "request"], {}),  # headers only
                   _broken("EnvoyExtensionPolicy", [*mode, "allowModeOverride"], False)):
        with pytest.raises(AssertionError):
            assert_policy_has_deploy_envoys_processing(broken)


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
