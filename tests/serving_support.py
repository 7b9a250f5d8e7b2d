"""Helpers for the serving tests: a Redis database per test, free ports, process launchers, a
torch-free stand-in pipeline for worker logic tests."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from PIL import Image

from ldm_serve.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = 11  # the serving tests own this database number and flush it


def redis_url(db: int = TEST_DB) -> str:
    """``REDIS_URL`` when set (CI), else the local server, with our database number."""
    parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit(parts._replace(path=f"/{db}"))


_embedded: list[Any] = []


def _reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.ConnectionError:
        return False


def redis_for_tests(db: int = TEST_DB) -> str:
    """``REDIS_URL`` when set (CI); else the local server on 6379; else an embedded Valkey
    started once for the test session (stopped at exit)."""
    url = redis_url(db)
    if "REDIS_URL" in os.environ or _reachable(url):
        return url
    if not _embedded:
        from ldm_serve.embedded_redis import EmbeddedRedisError, EmbeddedValkey

        server = EmbeddedValkey(port=free_port())
        try:
            server.start()
        except EmbeddedRedisError as exc:
            pytest.skip(f"no Redis at {url} and no embedded Valkey ({exc}); set REDIS_URL")
        atexit.register(server.stop)
        _embedded.append(server)
    base = urlsplit(_embedded[0].url)
    return urlunsplit(base._replace(path=f"/{db}"))




def require_redis(url: str) -> redis.Redis:
    """A client for ``url`` with the database flushed; skips the test when Redis is unreachable."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {url} (set REDIS_URL)")
    client.flushdb()
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**settings: Any) -> dict[str, str]:
    """Environment of a gateway / worker child: ``LDM_<NAME>`` for each setting."""
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two shared cores: keep each worker to one thread
    env["MKL_NUM_THREADS"] = "1"
    for key, value in settings.items():
        env[f"LDM_{key.upper()}"] = str(value)
    return env


def start_process(args: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the OS when the child exits
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    def ok() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited: {log_path.read_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(ok, timeout_s, url, interval_s=0.2)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------
# A torch-free stand-in for ldm.pipeline.LatentDiffusionPipeline (worker logic tests only)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeRow:
    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    strength: float = 1.0
    image: Any = None
    mask: Any = None


@dataclass(frozen=True)
class FakeProgress:
    row: int
    step: int
    total: int


class FakePipeline:
    """Follows the ``generate`` contract: per-row steps, ``on_step`` drops rows, ``on_image`` per row.

    The image colour is a function of the row's seed only, like the real model's batch invariance.
    A prompt containing ``BAD`` is refused by ``validate_row``; ``EXPLODE`` makes ``generate`` raise.
    """

    name = "fake"
    untrained = True
    downsample_factor = 8
    default_size = 64
    max_prompt_tokens = 77
    inpaint_mode = "blend"

    def __init__(self, step_sleep_s: float = 0.0) -> None:
        self.step_sleep_s = step_sleep_s
        self.calls: list[int] = []  # rows per generate() call
        self.validated: list[str] = []  # prompts of the rows validate_row saw, in order

    def step_count(self, steps: int) -> int:
        return steps

    def validate_row(self, row: FakeRow, width: int, height: int) -> None:
        self.validated.append(row.prompt)
        if "BAD" in row.prompt:
            raise InvalidInput("prompt", "contains the forbidden test word BAD")

    def generate(
        self,
        rows: Sequence[FakeRow],
        width: int,
        height: int,
        *,
        on_step: Callable[[list[FakeProgress]], Iterable[int] | None] | None = None,
        on_image: Callable[[int, Image.Image], None] | None = None,
        validate: bool = True,
    ) -> list[Image.Image | None]:
        if validate:
            for row in rows:
                self.validate_row(row, width, height)
        if any("EXPLODE" in r.prompt for r in rows):
            raise RuntimeError("simulated device failure")
        self.calls.append(len(rows))
        active = set(range(len(rows)))
        out: list[Image.Image | None] = [None] * len(rows)
        for step in range(1, max(r.steps for r in rows) + 1):
            if self.step_sleep_s:
                time.sleep(self.step_sleep_s)
            progress = [FakeProgress(i, step, rows[i].steps) for i in sorted(active) if step <= rows[i].steps]
            if not progress:
                break
            dropped = set(on_step(progress) or ()) if on_step else set()
            active -= dropped
            for p in progress:
                if p.row in active and p.step == p.total:
                    seed = rows[p.row].seed
                    img = Image.new("RGB", (width, height), (seed % 256, (seed // 256) % 256, 7))
                    out[p.row] = img
                    active.discard(p.row)
                    if on_image:
                        on_image(p.row, img)
        return out


def start_hook_server(
    answer: Callable[[dict[str, str], bytes], int], path: str = "/hook"
) -> tuple[ThreadingHTTPServer, str]:
    """A webhook receiver on a free loopback port, serving from a daemon thread.

    ``answer(headers, body)`` (header names lower-cased) records a POST and returns its status.
    Returns the server (``shutdown()`` it) and the URL to give as the webhook.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = answer({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"
