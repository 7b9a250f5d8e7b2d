"""``ldm-serve up | gateway | worker``: running the service.

``up`` is the zero-configuration path: without ``LDM_REDIS_URL`` or ``REDIS_URL`` it starts an embedded
Valkey server (append-only file in ``--data-dir``, so queued jobs survive a restart),
then the gateway and one worker as child processes, waits until the gateway is
ready, prints the URL, and supervises: a child that exits is restarted with
capped exponential backoff (:mod:`launcher.supervisor`) while the others keep
running, and ``/readyz`` says why it is not ready meanwhile. Ctrl-C / SIGTERM shut
everything down in order (gateway, then worker after its current batch, then Valkey);
if ``up`` itself is killed, the children get SIGTERM from the kernel.
``gateway`` and ``worker`` run one part each, for real deployments.

Settings come from ``LDM_*`` environment variables (see :class:`ldm_serve.settings.Settings`);
command-line options override them.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from launcher.supervisor import Child, FatalChildExit, Supervisor
from ldm_serve.errors import QueueUnavailable
from ldm_serve.jobstore import JobStore
from ldm_serve.settings import Settings

log = logging.getLogger("ldm_serve.up")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by the options the user gave."""
    overrides = {k: v for k, v in extra.items() if v is not None}
    return Settings(**overrides)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from service.main import run_gateway

    run_gateway(_settings(args, host=args.host, port=args.port, grpc_port=args.grpc_port))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(
        args,
        model_path=args.model,
        worker_name=args.name,
        device=args.device,
        dtype=args.dtype,
        max_batch_rows=args.max_batch_rows,
        worker_metrics_port=args.metrics_port,
    )
    from ldm_serve.cpu_allocator import use_cpu_allocator

    # before torch loads: may restart this process (same PID) with jemalloc preloaded
    allocator = use_cpu_allocator(settings.cpu_allocator, settings.device)
    log.info("memory allocator: %s (LDM_CPU_ALLOCATOR=%s)", allocator, settings.cpu_allocator)
    if settings.model_path is None:
        settings = settings.model_copy(update={"model_path": _default_model()})
    run_worker(settings)
    return 0


def _default_model() -> Path:
    """The bundled model, else the tiny untrained one (``worker.default_model``: written to the cache once)."""
    from worker.default_model import default_model

    model = default_model()
    if model.untrained:
        print("WARNING: no trained model is installed; serving a tiny RANDOM, UNTRAINED model "
              "(images are noise). Pass --model PATH for real output.", file=sys.stderr)
    return model.path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _describe_models(store: JobStore) -> str:
    """The models of the live workers, read from Redis (works whether or not API keys are set)."""
    try:
        workers = store.live_workers()
    except QueueUnavailable:
        return "?"
    untrained = {w.model: w.untrained for w in workers}
    return ", ".join(
        m + ("  ** UNTRAINED: random weights, images are noise **" if untrained[m] else "") for m in sorted(untrained)
    ) or "?"


def _stop(proc: Any, name: str, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {timeout_s:.0f}s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _lock_data_dir(directory: Path, wait_s: float = 60.0) -> int:
    """Hold ``directory/up.lock`` (flock) so that two ``up`` never share one append-only file.

    The embedded Valkey inherits the descriptor, so the lock lasts until the server has exited,
    even when ``up`` itself was killed; a new ``up`` waits for it up to ``wait_s``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise SystemExit(
                    f"error: {directory} is in use by another `ldm-serve up` (or its Valkey); "
                    "stop it or pass another --data-dir"
                ) from None
            if not told:
                print(f"waiting for the previous user of {directory} to finish...", file=sys.stderr)
                told = True
            time.sleep(0.2)


def _note_store(redis_url: str, settings: Settings) -> JobStore:
    """A JobStore on a fail-fast client, for the supervisor's notes (Valkey may be down)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        redis_url, socket_connect_timeout=0.5, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    return JobStore(client, settings)


def _cmd_up(args: argparse.Namespace) -> int:
    # Ctrl-C, and SIGTERM from a process manager, both stop the children in order;
    # set explicitly, since a shell starting us in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    from ldm_serve.embedded_redis import EmbeddedValkey, configured_redis_url, sigterm_on_parent_death
    from ldm_serve.models import data_dir as default_data_dir

    env = dict(os.environ)
    redis_url = configured_redis_url(env)
    embedded: EmbeddedValkey | None = None
    lock_fd: int | None = None
    sup: Supervisor | None = None
    store: JobStore | None = None
    model = Path(args.model) if args.model else _default_model()
    say = functools.partial(print, file=sys.stderr, flush=True)
    settings = _settings(args, data_dir=args.data_dir, grpc_port=args.grpc_port)
    try:
        children: list[Child] = []
        if redis_url is None:
            data_dir = Path(settings.data_dir or default_data_dir()).expanduser().resolve()
            lock_fd = _lock_data_dir(data_dir)
            embedded = EmbeddedValkey(
                dir=data_dir / "valkey", persistence=True, die_with_parent=True, pass_fds=(lock_fd,),
                startup_timeout_s=120.0,  # loading a large append-only file
            )
            redis_url = embedded.start()
            say(f"started embedded Valkey at {redis_url} (pid {embedded.pid}; data in {data_dir})")
            valkey = Child("valkey", spawn=lambda: (embedded.restart(), embedded.process)[1], fatal_before_ready=False)
            valkey.process, valkey.started_at = embedded.process, time.monotonic()
            children.append(valkey)
        settings = settings.model_copy(update={"redis_url": redis_url})
        store = _note_store(redis_url, settings)
        env["LDM_REDIS_URL"] = redis_url
        child = [sys.executable, "-m", "launcher"]
        # Own sessions: Ctrl-C reaches only this process, which stops the children in order.
        spawn: dict[str, Any] = {"env": env, "start_new_session": True}
        if sys.platform.startswith("linux"):
            spawn["preexec_fn"] = sigterm_on_parent_death
        if lock_fd is not None:  # a new `up` on this data dir waits until these have exited too
            spawn["pass_fds"] = (lock_fd,)
        worker_argv = [*child, "worker", "--model", str(model)]
        gateway_argv = [*child, "gateway", "--host", args.host, "--port", str(args.port)]
        if settings.grpc_port is not None:
            gateway_argv += ["--grpc-port", str(settings.grpc_port)]
        workers = [Child("worker", spawn=lambda: subprocess.Popen(worker_argv, **spawn))]
        gateways = [Child("gateway", spawn=lambda: subprocess.Popen(gateway_argv, **spawn))]

        def note(name: str, text: str | None) -> None:
            try:
                store.set_supervisor_note(name, text)
            except QueueUnavailable:
                pass  # Valkey itself is down: /readyz says so

        def on_exit(name: str, pid: int) -> None:
            if name != "worker":
                return
            try:  # its jobs go back to the queue now, not after the heartbeat TTL
                store.expire_workers_of_process(socket.gethostname(), pid)
                recovered = store.recover_dead_workers()
            except QueueUnavailable:
                return  # the restarted worker's reaper does it
            if recovered:
                say(f"worker: re-queued {len(recovered)} interrupted job(s)")

        sup = Supervisor(children + workers + gateways, note=note, on_exit=on_exit, say=say)
        _clear_notes(store)
        for c in workers + gateways:
            sup.start(c)
        url = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + args.ready_timeout
        while not _ready(url):
            sup.poll()
            if time.monotonic() > deadline:
                say("error: the service did not become ready (see the logs above)")
                return 1
            time.sleep(0.5)
        sup.ready_once = True
        print(f"\nldm-serve is up: {url}   (playground: {url}/, API docs: {url}/docs; Ctrl-C to stop)", flush=True)
        if settings.grpc_port is not None:
            print(f"gRPC (ldm_serve.v1.GenerationService): {args.host}:{settings.grpc_port}", flush=True)
        print(f"serving: {_describe_models(store)}\n", flush=True)
        while True:  # crashed children are restarted with backoff; only Ctrl-C / SIGTERM ends this
            sup.poll()
            time.sleep(0.25)
    except FatalChildExit as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\nstopping...")
        return 0
    finally:
        if sup is not None:
            sup.stopping = True
            procs = {c.name: c.process for c in sup.children}
            _stop(procs.get("gateway"), "gateway", 10)
            _stop(procs.get("worker"), "worker", 120)
        if store is not None:
            _clear_notes(store)
        if embedded is not None:
            embedded.stop()
        if lock_fd is not None:
            os.close(lock_fd)


def _clear_notes(store: JobStore) -> None:
    """Forget the supervisor notes of an earlier run (or of this one, when stopping)."""
    try:
        store.clear_supervisor_notes()
    except QueueUnavailable:
        pass


def add_commands(subparsers: Any) -> None:
    """Add ``up``, ``gateway`` and ``worker`` to the ``ldm-serve`` parser."""
    up = subparsers.add_parser("up", help="embedded Valkey (unless LDM_REDIS_URL or REDIS_URL) + gateway + one worker")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model", help="checkpoint to serve (default: the bundled model)")
    up.add_argument("--grpc-port", type=int, default=None,
                    help="also serve the gRPC API on this port (default: LDM_GRPC_PORT, else off)")
    up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    up.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded Valkey keeps its append-only file (default: LDM_DATA_DIR, else "
        "$XDG_DATA_HOME/ldm-serve or ~/.local/share/ldm-serve); unused with REDIS_URL",
    )
    up.set_defaults(func=_cmd_up)

    gw = subparsers.add_parser("gateway", help="run the HTTP gateway (FastAPI, uvicorn)")
    gw.add_argument("--host", default=None, help="default: LDM_HOST or 127.0.0.1")
    gw.add_argument("--port", type=int, default=None, help="default: LDM_PORT or 8000")
    gw.add_argument("--grpc-port", type=int, default=None,
                    help="also serve the gRPC API on this port (default: LDM_GRPC_PORT, else off)")
    gw.set_defaults(func=_cmd_gateway)

    wk = subparsers.add_parser("worker", help="run one batching generation worker")
    wk.add_argument("--model", default=None, help="checkpoint (default: LDM_MODEL_PATH, else the bundled model)")
    wk.add_argument("--name", default=None, help="worker name in the registry (default: host-pid-random)")
    wk.add_argument("--device", default=None, help="torch device (default: LDM_DEVICE or cpu)")
    wk.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="weights and activations (default: LDM_DTYPE or float32)")
    wk.add_argument("--max-batch-rows", type=int, default=None)
    wk.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    wk.set_defaults(func=_cmd_worker)

