"""The same requests through Triton and through the RQ service: images/s and latency, side by side.

* **triton**: ``ldm-serve export-triton --backend torchscript`` of the model, served by the
  ``tritonserver`` of the ``nvidia-pytriton`` wheel (KIND_CPU, dynamic batching), called over
  KServe v2 HTTP with ``tritonclient``;
* **rq**: ``ldm-serve up`` (gateway + Redis/Valkey + one worker, its defaults: backend ``auto``
  = torchscript on the CPU), once with the worker's request-level batching (``LDM_BATCHING=request``,
  the same policy as Triton's dynamic batcher: a batch runs start to finish) and once with its default
  continuous batching; each client ``POST /v1/txt2img`` with ``Prefer: wait`` and then fetches the image.

Each path: one warm-up request, then ``--requests`` one-image requests from ``--clients``
threads (closed loop; seed ``i`` for request ``i``). Both servers run alone on the machine, one
after the other, with the same thread settings. Prints a Markdown table.

Run it with the Triton venv's python (``make triton-venv``; docs/triton.md)::

    .venv-triton/bin/python bench/triton_bench.py                  # bundled model, 64 px, 25 steps
    .venv-triton/bin/python bench/triton_bench.py --clients 8 --requests 64 --steps 50
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.tritonserver_local import start_tritonserver  # noqa: E402

MODEL = "ldm-bench"


@dataclass
class Run:
    path: str
    requests: int
    wall_s: float
    latencies: list[float]

    @property
    def images_per_s(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: str, clients: int, requests: int, one: Callable[[int], None]) -> Run:
    latencies: list[float] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        t0 = time.perf_counter()
        one(i)
        with lock:
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(task, range(requests)))
    return Run(path, requests, time.perf_counter() - t0, latencies)


def wait(pred: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited ({proc.returncode})")
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_triton(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> Run:
    import tritonclient.http as httpclient

    export = [sys.executable, "-m", "launcher", "export-triton", "--out", str(tmp / "repo"), "--name", MODEL,
              "--backend", "torchscript", "--max-batch-size", str(args.max_batch_rows)]
    if args.model:
        export += ["--model", args.model]
    subprocess.run(export, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    ports = [free_port() for _ in range(3)]
    proc = start_tritonserver([tmp / "repo"], tmp, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                              env=env)  # fmt: skip
    url = f"127.0.0.1:{ports[0]}"
    try:
        probe = httpclient.InferenceServerClient(url)
        wait(lambda: probe.is_model_ready(MODEL), 300, "tritonserver", proc)
        local = threading.local()

        def one(i: int) -> None:
            if not hasattr(local, "client"):
                local.client = httpclient.InferenceServerClient(url, network_timeout=600.0)
            inputs = []
            for name, value, dtype, np_dtype in (
                ("PROMPT", f"bench {i}".encode(), "BYTES", object), ("SEED", i, "INT64", np.int64),
                ("STEPS", args.steps, "INT32", np.int32), ("GUIDANCE_SCALE", args.guidance, "FP32", np.float32),
                ("WIDTH", args.size, "INT32", np.int32), ("HEIGHT", args.size, "INT32", np.int32),
            ):  # fmt: skip
                tensor = httpclient.InferInput(name, [1, 1], dtype)
                tensor.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
                inputs.append(tensor)
            image = local.client.infer(MODEL, inputs).as_numpy("IMAGE")
            assert image.shape == (1, args.size, args.size, 3)

        one(10**6)  # warm-up
        return load("triton", args.clients, args.requests, one)
    finally:
        stop(proc)


def bench_rq(args: argparse.Namespace, env: dict[str, str], tmp: Path, batching: str) -> Run:
    port = free_port()
    env = dict(env, LDM_MAX_BATCH_ROWS=str(args.max_batch_rows), LDM_MAX_QUEUE_DEPTH="100000", LDM_BATCHING=batching)
    env.pop("REDIS_URL", None)  # embedded Valkey in tmp
    cmd = [sys.executable, "-m", "launcher", "up", "--port", str(port), "--data-dir", str(tmp / "data")]
    if args.model:
        cmd += ["--model", args.model]
    log = (tmp / "up.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 600, "ldm-serve up", proc)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        with httpx.Client(base_url=url, timeout=600, limits=limits) as client:
            body = {"width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": args.guidance}

            def one(i: int) -> None:
                r = client.post("/v1/txt2img", json={**body, "prompt": f"bench {i}", "seed": i},
                                headers={"Prefer": "wait=60"})  # fmt: skip
                job = r.json()
                if r.status_code != 200 or job.get("status") != "succeeded":
                    raise RuntimeError(f"job did not finish: HTTP {r.status_code} {job}")
                client.get(job["images"][0]["url"]).raise_for_status()

            one(10**6)  # warm-up
            return load(f"rq, {batching} batching (ldm-serve up)", args.clients, args.requests, one)
    finally:
        stop(proc)


def report(args: argparse.Namespace, runs: list[Run], load_before: float) -> str:
    import torch

    model = args.model or "bundled (models/bundled)"
    lines = [
        f"Setup: model {model}, {args.size} px, {args.steps} DDIM steps, guidance {args.guidance}, "
        f"{args.clients} concurrent clients, {args.requests} one-image requests each path (closed loop, after one "
        f"warm-up), max {args.max_batch_rows} rows a batch; torchscript on both paths; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other jobs on the machine). One run.",
        "",
        "| path | images/s | p50 latency (s) | p90 latency (s) | mean latency (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r.path} | {r.images_per_s:.2f} | {r.pct(0.5):.2f} | {r.pct(0.9):.2f} | "
                     f"{statistics.fmean(r.latencies):.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch-rows", type=int, default=8)
    p.add_argument("--paths", default="triton,rq-request,rq", help="which paths, in order: triton, rq-request "
                   "(the worker's request-level batching, like Triton's dynamic batcher), rq (its default, continuous)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    runs = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        env["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        for path in args.paths.split(","):
            where = Path(tmp) / path
            where.mkdir()
            if path == "triton":
                runs.append(bench_triton(args, env, where))
            else:
                runs.append(bench_rq(args, env, where, "request" if path == "rq-request" else "continuous"))
            print(f"{runs[-1].path}: {runs[-1].images_per_s:.2f} images/s", file=sys.stderr, flush=True)
    print(report(args, runs, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
