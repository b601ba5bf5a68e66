"""The Kubernetes sidecar config starts as docs/deploy.md says: without the optional provider-key Secret
and before the vLLM Service's name resolves, the pod becomes ready, `/readyz` names both backends, and
their requests get a 503 in the OpenAI shape through the real Envoy (deploy/envoy.yaml)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from extproc.local.stack import REPO, Stack, free_port, wait_for_port

from .conftest import RedisServer

PASSWORD = "k8s-redis-password"


@pytest.fixture(scope="module")
def k8s_gateway(tmp_path_factory):
    work = Path(tmp_path_factory.mktemp("k8s"))
    redis = RedisServer(work, args=("--requirepass", PASSWORD))
    doc = yaml.safe_load((REPO / "deploy" / "k8s" / "extproc-config.yaml").read_text())
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    doc.update(listen=f"127.0.0.1:{extproc}", admin_listen=f"127.0.0.1:{admin}")
    doc["state"]["redis_url"] = redis.url  # the cluster's Redis Service, here on loopback
    vllm = next(b for b in doc["backends"] if b["name"] == "vllm")
    assert vllm["endpoints"] == [{"dns": "vllm-headless.llm.svc.cluster.local:8000"}]  # no cluster DNS here
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    stack = Stack()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("OPENAI_API_KEY", raising=False)  # the optional Secret is absent
            sidecar = stack.start_sidecar(cfg, env={"REDIS_PASSWORD": PASSWORD})
        wait_for_port(extproc, timeout=30, proc=sidecar)
        stack.start_envoy(port, envoy_admin, extproc)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", stack
    finally:
        stack.stop()
        redis.stop()


def test_ready_without_the_optional_secret_naming_what_cannot_serve(k8s_gateway):
    _, admin, stack = k8s_gateway
    with urllib.request.urlopen(admin + "/readyz", timeout=10) as r:
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        ready = json.loads(r.read())
    assert ready["status"] == "ready"
    assert ready["unserved"] == [
        "Backend 'vllm' has no instances: vllm-headless.llm.svc.cluster.local:8000 resolves to no address yet",
        "Backend 'openai' is not configured: the environment variable OPENAI_API_KEY (its api_key_env) is not "
        "set in the gateway sidecar"]
    assert ready["backends"] == [{"name": "vllm", "state": "healthy"}, {"name": "openai", "state": "healthy"}]
    log = stack.log("sidecar")
    assert "OPENAI_API_KEY is not set or empty" in log and "does not resolve now" in log


@pytest.mark.parametrize(("model", "code", "named"), [
    ("gpt-5", "backend_unconfigured", "OPENAI_API_KEY"),
    ("llama-3", "no_endpoints", "vllm-headless.llm.svc.cluster.local:8000"),
])
def test_requests_for_them_get_503_in_the_openai_shape(k8s_gateway, model, code, named):
    url, _, _ = k8s_gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="client-key", max_retries=0, timeout=30)
    for call in (lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.responses.create(model=model, input="hi")):
        with pytest.raises(openai.InternalServerError) as e:
            call()
        assert e.value.status_code == 503
        assert e.value.body["code"] == code and named in e.value.body["message"]
