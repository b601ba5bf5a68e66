"""The monitoring profile as shipped: deploy/grafana's dashboard and provisioning, Prometheus's scrape
config, and the docker compose services that tie them to the sidecar. The dashboard's queries are
checked against a real scrape in tests/test_e2e_ops.py."""

from __future__ import annotations

import json
import re

import yaml

from extproc.config import load_config
from extproc.local.stack import REPO

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-api-bridge.json"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
_NAME_RE = re.compile(r"\b((?:extproc|gen_ai)_[a-z_]+)\b")


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def metric_like_names(expr: str) -> set[str]:
    """The sidecar's metric (and gen_ai_* label) names a PromQL expression mentions."""
    return set(_NAME_RE.findall(expr))


def test_dashboard_covers_what_operators_need():
    used = set().union(*(metric_like_names(e) for _, e in dashboard_queries()))
    for name in ("extproc_requests_total", "extproc_tokens_total", "gen_ai_client_token_usage_bucket",
                 "gen_ai_server_time_to_first_token_seconds_bucket", "gen_ai_server_time_per_output_token_seconds_bucket",
                 "gen_ai_server_request_duration_seconds_bucket", "extproc_translations_total",
                 "extproc_pin_decisions_total", "extproc_state_store_errors_total", "extproc_learned_modes_total"):
        assert name in used, name


def test_panels_use_the_provisioned_datasource_and_are_described():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (ds,) = datasources["datasources"]
    doc = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    for panel in doc["panels"]:
        assert panel["description"], panel["title"]
        for ref in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert ref == {"type": ds["type"], "uid": ds["uid"]}, panel["title"]
    # Grafana reaches Prometheus in the sidecar's network namespace, by the sidecar's service name.
    prom = COMPOSE["services"]["prometheus"]
    assert prom["network_mode"] == "service:sidecar"
    assert ds["url"] == "http://sidecar:9090"


def _mounts(service: str) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"][service]["volumes"]}


def test_compose_monitoring_profile_mounts_what_it_provisions():
    for name in ("prometheus", "grafana"):
        assert COMPOSE["services"][name]["profiles"] == ["monitoring"]
        for host in _mounts(name).values():
            assert (REPO / host).exists(), host
    grafana = _mounts("grafana")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-api-bridge.yaml").read_text())
    (provider,) = providers["providers"]
    assert (REPO / grafana[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    assert (REPO / grafana["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()


def test_prometheus_scrapes_the_sidecar_admin_port_of_the_compose_config():
    prom = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    args = COMPOSE["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in args
    assert _mounts("prometheus")["/etc/prometheus/prometheus.yml"] == "./deploy/grafana/prometheus.yml"
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "llm-api-bridge-sidecar"]
    sidecar_config = load_config(str(REPO / "deploy" / "config.yaml"))  # the compose sidecar's config
    assert job["static_configs"][0]["targets"] == [sidecar_config.admin_listen]
    assert job["metrics_path"] == "/metrics"
