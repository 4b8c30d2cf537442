"""deploy/ stays valid: the Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate), the compose file and Envoy config by structure, and every metric
a Grafana panel queries exists on a live server's /metrics, so the dashboard cannot drift
from the code."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama
from engine_helpers import make_engine
from server_helpers import free_port, request, serving

from nolaserve.adapters.nola import random_nola
from nolaserve.server.config import Config
from nolaserve.v1 import admin_pb2

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"
METRIC = re.compile(r"\b(?:nolaserve_[a-z0-9_]+|vllm:[a-z_]+)")


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and not doc["apiVersion"].startswith("kustomize."):
                docs.append((f"{path.name}:{doc['kind']}", doc))
    return docs


@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_kubernetes_manifests_match_the_schemas(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_manifests_hold_what_a_fleet_needs():
    docs = {doc["kind"]: doc for _, doc in manifests()}
    assert {"Deployment", "Service", "Secret", "ConfigMap"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] and container["livenessProbe"]["grpc"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
    assert secret_keys <= set(docs["Secret"]["stringData"])
    config = yaml.safe_load(docs["ConfigMap"]["data"]["nolaserve.yaml"])
    Config.load(None, **config)  # the YAML is a valid nolaserve config
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"} == \
        set(kustomization["resources"])


def test_compose_and_envoy_route_grpc_and_http_to_both_replicas():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"postgres", "replica-a", "replica-b", "envoy"} <= set(compose["services"])
    Config.load(DEPLOY / "nolaserve.yaml")
    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())["static_resources"]
    ports = {lst["address"]["socket_address"]["port_value"] for lst in envoy["listeners"]}
    assert {50051, 8000} <= ports
    for cluster in envoy["clusters"]:
        hosts = {e["endpoint"]["address"]["socket_address"]["address"]
                 for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]}
        assert hosts == {"replica-a", "replica-b"}, cluster["name"]
        assert cluster["health_checks"]


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "nolaserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in METRIC.findall(e)}


def test_every_metric_a_dashboard_panel_queries_exists(bytebpe):
    engine = make_engine(tiny_llama(vocab_size=300), bytebpe)
    data = random_nola(engine.store.spec, seed=1, rank=4, num_basis=16).to_bytes()

    async def main() -> str:
        async with serving(engine, metrics_port=free_port()) as c:
            await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(adapter_id="a",
                                                                           data=data))
            await c.inference.Generate(request(max_tokens=3, adapter="a"))
            url = f"http://127.0.0.1:{c.running.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())

    text = asyncio.run(main())
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    queried = dashboard_metrics()
    assert "nolaserve_registry_up" in queried and "nolaserve_adapter_slots_pinned" in queried
    assert queried <= exported, sorted(queried - exported)
