"""Failures: a worker killed mid-batch, a worker stopped with SIGTERM, Redis going away."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import COMMON, start_gateway, start_worker
from tests.serving_support import child_env, free_port, stop_process, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def _job(c: httpx.Client, job_id: str) -> dict:
    return c.get(f"/v1/jobs/{job_id}").json()


def test_killed_worker_loses_no_job_and_sigterm_finishes_the_batch(
    integration_redis: str, model_path: Path, tmp_path: Path
) -> None:
    env = child_env(redis_url=integration_redis, redis_prefix="itkill", batch_window_ms=300,
                    default_model="random-untrained", **COMMON)
    url, gateway = start_gateway(tmp_path, env)
    victim = rescuer = None
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            body = {"width": 64, "height": 64, "steps": 50}
            # queued before any worker exists, so the first worker takes all three as one batch
            ids = [c.post("/v1/txt2img", json={**body, "prompt": f"k{i}", "seed": i}).json()["id"] for i in range(3)]
            victim = start_worker(tmp_path, env, model_path, "victim")
            wait_until(lambda: all(_job(c, i)["status"] == "running" for i in ids), 90, "the batch to run")
            assert len({_job(c, i)["batch"]["id"] for i in ids}) == 1
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            rescuer = start_worker(tmp_path, env, model_path, "rescuer")
            jobs = [wait_until(lambda i=i: (j := _job(c, i))["status"] in TERMINAL and j, 120, f"job {i}")
                    for i in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
            assert all(j["attempts"] == 2 for j in jobs)
            models = c.get("/v1/models").json()["data"]
            assert models[0]["workers"] == 1  # the dead worker is gone from the registry

            # SIGTERM: the running batch finishes, then the worker exits cleanly and deregisters.
            job_id = c.post("/v1/txt2img", json={**body, "prompt": "graceful"}).json()["id"]
            wait_until(lambda: _job(c, job_id)["status"] == "running", 60, "the job to run")
            rescuer.send_signal(signal.SIGTERM)
            assert rescuer.wait(60) == 0
            assert _job(c, job_id)["status"] == "succeeded"
            assert c.get("/v1/models").json()["data"] == []
    finally:
        for p in (victim, rescuer, gateway):
            if p is not None:
                stop_process(p)


def test_redis_down_gives_503_and_the_gateway_recovers(tmp_path: Path) -> None:
    embedded_redis = pytest.importorskip("ldm_serve.embedded_redis")
    port = free_port()
    server = embedded_redis.EmbeddedValkey(port=port, dir=tmp_path / "valkey")
    try:
        redis_url = server.start()
    except embedded_redis.EmbeddedRedisError as exc:
        pytest.skip(f"no embedded Valkey: {exc}")
    env = child_env(redis_url=redis_url, redis_prefix="itdown", default_model="ghost", **COMMON)
    url, gateway = start_gateway(tmp_path, env)
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 4}
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v1/txt2img", json=body).status_code == 202
            server.stop()
            r = c.post("/v1/txt2img", json=body)
            assert r.status_code == 503 and r.json()["error"]["type"] == "queue_unavailable"
            assert c.get(f"/v1/jobs/{'a' * 26}").status_code == 503  # a well-formed id reaches Redis
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
            server = embedded_redis.EmbeddedValkey(port=port, dir=tmp_path / "valkey2")
            server.start()
            wait_until(lambda: c.post("/v1/txt2img", json=body).status_code == 202, 20, "recovery")
    finally:
        stop_process(gateway)
        server.stop()
