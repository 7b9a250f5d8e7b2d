"""``ldm-serve up | gateway | worker``: running the service.

``up`` is the zero-configuration path: without ``REDIS_URL`` it starts an embedded
Valkey server, then the gateway and one worker as child processes, waits until
the gateway is ready, prints the URL and shuts everything down in order on
Ctrl-C (gateway, then worker after its current batch, then Valkey).
``gateway`` and ``worker`` run one part each, for real deployments.

Settings come from ``LDM_*`` environment variables (see :class:`ldm_serve.settings.Settings`);
command-line options override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm_serve.settings import Settings

log = logging.getLogger("ldm_serve.up")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by the options the user gave."""
    overrides = {k: v for k, v in extra.items() if v is not None}
    return Settings(**overrides)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from service.main import run_gateway

    run_gateway(_settings(args, host=args.host, port=args.port))
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
    if settings.model_path is None:
        settings = settings.model_copy(update={"model_path": _default_model()})
    run_worker(settings)
    return 0


def _default_model() -> Path:
    """The bundled model, else the tiny untrained one (written to the cache once)."""
    from ldm_serve.models import bundled_model_path, random_model_path

    bundled = bundled_model_path()
    if bundled is not None:
        return bundled
    print("WARNING: no trained model is installed; serving a tiny RANDOM, UNTRAINED model "
          "(images are noise). Pass --model PATH for real output.", file=sys.stderr)
    return random_model_path()


def _die_with_parent() -> None:
    """Child pre-exec hook (Linux): get SIGTERM if ``up`` itself dies without cleaning up."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _wait_ready(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _describe_models(url: str) -> str:
    import json

    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
            models = json.load(resp)["data"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return "?"
    return ", ".join(
        m["id"] + ("  ** UNTRAINED: random weights, images are noise **" if m.get("untrained") else "")
        for m in models
    )


def _stop(proc: subprocess.Popen[bytes] | None, name: str, timeout_s: float) -> None:
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


def _cmd_up(args: argparse.Namespace) -> int:
    # Ctrl-C, and SIGTERM from a process manager, both stop the children in order;
    # set explicitly, since a shell starting us in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env = dict(os.environ)
    redis_url = env.get("LDM_REDIS_URL") or env.get("REDIS_URL")
    embedded = None
    gateway = worker = None
    model = Path(args.model) if args.model else _default_model()
    try:
        if redis_url is None:
            from ldm_serve.embedded_redis import start_embedded_redis
            from ldm_serve.models import cache_dir

            embedded = start_embedded_redis(cache_dir() / "valkey")
            redis_url = embedded.url
            print(f"started embedded Valkey at {redis_url} (pid {embedded.pid})", file=sys.stderr)
        env["LDM_REDIS_URL"] = redis_url
        child = [sys.executable, "-m", "ldm_serve.serving_cli"]
        # Own sessions: Ctrl-C reaches only this process, which stops the children in order.
        spawn = {"env": env, "start_new_session": True}
        if sys.platform.startswith("linux"):
            spawn["preexec_fn"] = _die_with_parent
        worker = subprocess.Popen([*child, "worker", "--model", str(model)], **spawn)
        gateway = subprocess.Popen([*child, "gateway", "--host", args.host, "--port", str(args.port)], **spawn)
        url = f"http://{args.host}:{args.port}"
        if not _wait_ready(url, [worker, gateway], args.ready_timeout):
            print("error: the service did not become ready (see the logs above)", file=sys.stderr)
            return 1
        print(f"\nldm-serve is up: {url}   (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
        print(f"serving: {_describe_models(url)}\n", flush=True)
        while worker.poll() is None and gateway.poll() is None:
            time.sleep(0.5)
        print("error: a service process exited unexpectedly", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        _stop(gateway, "gateway", 10)
        _stop(worker, "worker", 120)
        if embedded is not None:
            embedded.stop()


def add_serving_commands(subparsers: Any) -> None:
    """Add ``up``, ``gateway`` and ``worker`` to the ``ldm-serve`` parser."""
    up = subparsers.add_parser("up", help="embedded Valkey (unless REDIS_URL) + gateway + one worker")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model", help="checkpoint to serve (default: the bundled model)")
    up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    up.set_defaults(func=_cmd_up)

    gw = subparsers.add_parser("gateway", help="run the HTTP gateway (FastAPI, uvicorn)")
    gw.add_argument("--host", default=None, help="default: LDM_HOST or 127.0.0.1")
    gw.add_argument("--port", type=int, default=None, help="default: LDM_PORT or 8000")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one serving subcommand (used for the child processes of ``up``)."""
    parser = argparse.ArgumentParser(prog="ldm-serve")
    add_serving_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
