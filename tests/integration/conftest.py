"""Real processes for the serving integration tests.

``service``: one gateway and one worker (the tiny random model) on a dedicated Redis
database. ``aux``: a gateway without any worker (jobs stay queued), with API keys and
a tiny queue bound. Both are started once per session; tests use unique prompts.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.serving_support import (
    child_env,
    free_port,
    redis_for_tests,
    require_redis,
    start_process,
    stop_process,
    wait_http,
    wait_until,
)

INTEGRATION_DB = 12
SECRET = "whsec_" + base64.b64encode(b"integration-test-secret-key-0123").decode()

COMMON = {
    "heartbeat_interval_s": 0.5,
    "heartbeat_ttl_s": 5,  # the machine is busy: a starved heartbeat thread must not look dead
    "reap_interval_s": 1,
    "max_width": 256,
    "max_height": 256,
    "max_steps": 60,
    "max_images": 4,
    "max_prompt_chars": 300,
    "max_upload_bytes": 200_000,
    "max_upload_pixels": 65_536,
    "webhook_secret": SECRET,
}


@dataclass
class Service:
    url: str
    prefix: str
    env: dict[str, str]
    logs: Path
    procs: list = field(default_factory=list)
    worker_metrics_url: str | None = None

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ldm.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def integration_redis() -> str:
    url = redis_for_tests(INTEGRATION_DB)
    require_redis(url)
    return url


def start_gateway(logs: Path, env: dict[str, str], name: str = "gateway") -> tuple[str, object]:
    port = free_port()
    log = logs / f"{name}.log"
    proc = start_process(["gateway", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", 60, proc, log)
    return url, proc


def start_worker(logs: Path, env: dict[str, str], model: Path, name: str, metrics_port: int | None = None):
    args = ["worker", "--model", str(model), "--name", name]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    return start_process(args, env, logs / f"{name}.log")


def wait_workers(url: str, n: int, timeout_s: float = 120, headers: dict | None = None, procs=()) -> None:
    def ready() -> bool:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process {p.args} exited with {p.returncode}")
        r = httpx.get(f"{url}/v1/models", timeout=2, headers=headers)
        return r.status_code == 200 and sum(m["workers"] for m in r.json()["data"]) >= n

    wait_until(ready, timeout_s, f"{n} live worker(s) at {url}", interval_s=0.2)


@pytest.fixture(scope="session")
def service(integration_redis: str, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("service-logs")
    env = child_env(
        redis_url=integration_redis, redis_prefix="it", batch_window_ms=400, max_batch_rows=8,
        allow_private_webhooks="true", webhook_retry_base_s=0.3, webhook_progress_interval_s=0, **COMMON,
    )
    metrics_port = free_port()
    worker = start_worker(logs, env, model_path, "it-worker-1", metrics_port)
    url, gateway = start_gateway(logs, env)
    svc = Service(url, "it", env, logs, [gateway, worker], f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        wait_workers(url, 1, procs=[worker])
        yield svc
    finally:
        for p in svc.procs:
            stop_process(p)
        if os.environ.get("LDM_TEST_SHOW_LOGS"):
            for log in logs.iterdir():
                print(f"===== {log.name}\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="session")
def aux(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A gateway with API keys, a queue bound of 3 and no worker: jobs stay queued."""
    logs = tmp_path_factory.mktemp("aux-logs")
    env = child_env(
        redis_url=integration_redis, redis_prefix="itaux", default_model="ghost", max_queue_depth=3,
        api_keys="key-a,key-b", queue_full_retry_after_s=7, **COMMON,
    )
    url, gateway = start_gateway(logs, env, "aux-gateway")
    try:
        yield Service(url, "itaux", env, logs, [gateway])
    finally:
        stop_process(gateway)
