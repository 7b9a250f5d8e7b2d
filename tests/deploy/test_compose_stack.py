"""The compose stack, for real, with podman: image build, txt2img and inpaint through the gateway,
a Redis restart with jobs queued (AOF: none lost), two workers scraped by Prometheus, teardown.

Marker ``deploy``: runs with ``make deploy-test`` only (minutes); skipped where podman or
podman-compose is missing. Images of Redis and Prometheus are built from a local Debian base
(``tests/deploy/standins``); on this sandbox ``bash ../shared/tools/containers-setup.sh`` makes
podman work and builds ``localhost/python:3.11-slim`` and ``localhost/debian:bookworm``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.deploy.tooling import ROOT, tool
from tests.serving_support import free_port, wait_until

pytestmark = pytest.mark.deploy

PROJECT = "ldmdeploytest"
IMAGE = "localhost/ldm-serve:cpu"
STANDINS = Path(__file__).parent / "standins"
COMPOSE_FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(Path(__file__).parent / "compose.test.yml")]


def _podman_image_exists(podman: str, name: str) -> bool:
    return subprocess.run([podman, "image", "exists", name], capture_output=True).returncode == 0


def _pip_config(key: str) -> str | None:
    res = subprocess.run(["python3", "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


def _sh(args: list[str], timeout: float = 1800, env: dict | None = None, check: bool = True) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def build_images(podman: str) -> dict[str, float]:
    """Build the project image and the Redis / Prometheus stand-ins; seconds per build."""
    py_base = "localhost/python:3.11-slim" if _podman_image_exists(podman, "localhost/python:3.11-slim") \
        else "python:3.11-slim"
    deb_base = "localhost/debian:bookworm" if _podman_image_exists(podman, "localhost/debian:bookworm") \
        else "debian:bookworm"
    fresh = ["--no-cache"] if os.environ.get("LDM_DEPLOY_NO_CACHE") == "1" else []  # time a cold build
    args = [podman, "build", *fresh, "--build-arg", f"BASE_IMAGE={py_base}", "-t", IMAGE]
    # as containers-setup.sh: pip's own CA bundle and wheel folder, so that pip inside the build reaches the index
    cert = os.environ.get("PIP_CERT") or _pip_config("global.cert") or ssl.get_default_verify_paths().openssl_cafile
    links = os.environ.get("PIP_FIND_LINKS") or _pip_config("global.find-links")
    if cert and Path(cert).is_file():
        args += ["-v", f"{cert}:{cert}:ro", "--build-arg", f"PIP_CERT={cert}"]
    if links and Path(links).is_dir():  # the local CPU torch wheel: no pytorch.org index needed
        args += ["-v", f"{links}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "TORCH_INDEX_URL="]
    times = {}
    t0 = time.monotonic()
    _sh([*args, str(ROOT)])
    times["ldm-serve"] = time.monotonic() - t0
    for name in ("redis", "prometheus"):
        t0 = time.monotonic()
        _sh([podman, "build", *fresh, "--build-arg", f"BASE_IMAGE={deb_base}", "-f", str(STANDINS / f"{name}.Dockerfile"),
             "-t", f"localhost/ldm-test-{name}:latest", str(STANDINS)])
        times[name] = time.monotonic() - t0
    return times


def _remove_leftovers(podman: str) -> None:
    """What ``podman-compose down -v`` leaves: replicas beyond the compose file's one (``--scale``), the
    containers they depend on, then the project's volumes and network."""
    label = f"label=io.podman.compose.project={PROJECT}"
    for _ in range(3):  # dependants first: each pass removes what nothing depends on any more
        ids = _sh([podman, "ps", "-a", "-q", "--filter", label], check=False).split()
        if not ids:
            break
        for cid in ids:
            _sh([podman, "rm", "-f", cid], check=False)
    for vol in _sh([podman, "volume", "ls", "-q", "--filter", label], check=False).split():
        _sh([podman, "volume", "rm", "-f", vol], check=False)
    _sh([podman, "network", "rm", "-f", f"{PROJECT}_default"], check=False)


def _png(mode: str, color: object) -> str:
    buf = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buf, format="PNG")  # type: ignore[arg-type]
    return base64.b64encode(buf.getvalue()).decode()


class Stack:
    def __init__(self, compose: str, podman: str, env: dict[str, str]) -> None:
        self.compose, self.podman, self.env = compose, podman, env
        self.url = f"http://127.0.0.1:{env['LDM_GATEWAY_PORT']}"
        self.prom = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        return _sh([self.compose, "-p", PROJECT, *COMPOSE_FILES, *args], timeout=timeout, env=self.env, check=check)

    def containers(self, service: str) -> list[str]:
        out = _sh([self.podman, "ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
                   "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"])
        return sorted(out.split())

    def live_workers(self) -> int:
        try:
            r = httpx.get(f"{self.url}/v1/models", timeout=5)
        except httpx.HTTPError:
            return 0
        return sum(m["workers"] for m in r.json()["data"]) if r.status_code == 200 else 0

    def logs(self) -> str:
        return self.run("logs", "--tail", "40", check=False, timeout=120)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    podman, compose = tool("podman"), tool("podman-compose")
    if podman is None:
        pytest.skip("podman not installed (on this sandbox: bash ../shared/tools/containers-setup.sh)")
    if compose is None:
        pytest.skip("podman-compose not installed (pip install podman-compose; part of the test extras)")
    t_start = time.monotonic()
    builds = build_images(podman)
    env = {**os.environ, "LDM_IMAGE": IMAGE, "REDIS_IMAGE": "localhost/ldm-test-redis:latest",
           "PROMETHEUS_IMAGE": "localhost/ldm-test-prometheus:latest", "GRAFANA_IMAGE": IMAGE,
           "GRAFANA_ADMIN_PASSWORD": "deploy-test", "LDM_GATEWAY_PORT": str(free_port()),
           "PROMETHEUS_PORT": str(free_port()), "GRAFANA_PORT": str(free_port())}
    s = Stack(compose, podman, env)
    s.run("down", "-v", check=False)
    _remove_leftovers(podman)
    try:
        t_up = time.monotonic()
        s.run("up", "-d", timeout=900)
        wait_until(lambda: s.live_workers() >= 1, 600, "a live worker behind the compose gateway", interval_s=2)
        s.timings = {"builds_s": builds, "up_to_ready_s": time.monotonic() - t_up}  # type: ignore[attr-defined]
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.run("down", "-v", timeout=600, check=False)
        _remove_leftovers(podman)
        label = f"label=io.podman.compose.project={PROJECT}"
        left = _sh([podman, "ps", "-a", "-q", "--filter", label]) + _sh([podman, "volume", "ls", "-q", "--filter", label])
        assert not left.split(), f"teardown left containers or volumes: {left}"
        total = time.monotonic() - t_start
        print(f"deploy test wall time: {total:.0f}s; builds {builds}")
        out = os.environ.get("LDM_DEPLOY_TIMINGS")
        if out:
            Path(out).write_text(json.dumps({"total_s": total, **getattr(s, "timings", {})}, indent=1))


def test_readme_request_and_inpaint_through_the_stack(stack: Stack) -> None:
    body = {"prompt": "a big red circle on the left of a small blue square, on a white background", "steps": 25,
            "guidance_scale": 5, "seed": 1}  # the README's curl, unchanged
    with httpx.Client(base_url=stack.url, timeout=90) as c:
        r = c.post("/v1/txt2img", headers={"Prefer": "wait=30"}, json=body)
        assert r.status_code in (200, 202), r.text
        job = wait_until(lambda: (j := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] not in (
            "queued", "running") and j, 300, "txt2img to finish")
        assert job["status"] == "succeeded", job
        img = Image.open(io.BytesIO(c.get(f"/v1/jobs/{job['id']}/images/0").content))
        assert img.size == (64, 64)
        r = c.post("/v1/inpaint", json={"prompt": "a blue square on the right", "steps": 10, "seed": 2,
                                        "image": _png("RGB", (250, 250, 250)), "mask": _png("L", 255)})
        assert r.status_code == 202, r.text
        job = wait_until(lambda: (j := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] not in (
            "queued", "running") and j, 300, "inpaint to finish")
        assert job["status"] == "succeeded" and job["kind"] == "inpaint", job
        assert c.get("/readyz").json()["status"] == "ready"


def test_redis_restart_with_jobs_queued_loses_none(stack: Stack) -> None:
    stack.run("stop", "worker", timeout=300)  # SIGTERM: the worker drains and deregisters; jobs now wait
    wait_until(lambda: stack.live_workers() == 0, 120, "the worker to stop", interval_s=1)
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        ids = []
        for i in range(3):
            # explicit size: with no live worker the gateway does not know the model's default size
            r = c.post("/v1/txt2img", json={"prompt": f"a small green triangle in the centre {i}", "steps": 10,
                                            "seed": i, "width": 64, "height": 64})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        assert all(c.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in ids)
        (redis,) = stack.containers("redis")
        _sh([stack.podman, "restart", redis], timeout=120)  # SIGTERM then start: the AOF is replayed
        wait_until(lambda: _sh([stack.podman, "exec", redis, "valkey-cli", "ping"], check=False).strip() == "PONG",
                   120, "Redis back", interval_s=1)
        wait_until(lambda: c.get("/readyz").json().get("redis") is True, 60, "the gateway to see Redis")
        stack.run("start", "worker", timeout=300)
        done = {}
        for j in ids:
            done[j] = wait_until(lambda j=j: (d := c.get(f"/v1/jobs/{j}").json())["status"] not in (
                "queued", "running") and d, 600, f"job {j} after the restart")
    assert [d["status"] for d in done.values()] == ["succeeded"] * 3, done


def test_scale_workers_to_two_and_prometheus_finds_both(stack: Stack) -> None:
    stack.run("up", "-d", "--scale", "worker=2", timeout=600)
    wait_until(lambda: stack.live_workers() >= 2, 600, "two live workers", interval_s=2)
    assert len(stack.containers("worker")) == 2

    def scraped() -> int:
        r = httpx.get(f"{stack.prom}/api/v1/query", params={"query": 'up{job="ldm-worker"} == 1'}, timeout=5)
        return len(r.json()["data"]["result"])

    wait_until(lambda: scraped() == 2, 180, "Prometheus to scrape both workers (DNS SD)", interval_s=2)
    r = httpx.get(f"{stack.prom}/api/v1/rules", timeout=5).json()
    assert {"LdmNoWorkerAlive", "LdmHighErrorRatio"} <= {
        rule["name"] for g in r["data"]["groups"] for rule in g["rules"]}
