"""Throughput and latency of the service vs the same model called in-process.

One run measures, for each concurrency level (default 1, 4, 16):

* **in-process**: ``concurrency`` threads, each calling ``pipeline.generate`` for one
  image at a time (a server without a queue and without cross-request batching);
* **service**: ``concurrency`` HTTP clients, each submitting ``POST /v1/txt2img`` with
  ``Prefer: wait=60`` and then fetching the image bytes, through a real gateway,
  Redis and one batching worker;

and, separately, the gateway's job-submission rate (jobs accepted per second, with
no worker consuming them). Results are printed as a Markdown table and, with
``--out``, written to a file (``docs/benchmarks.md``).

Usage::

    python bench/serve_bench.py                       # tiny random model, embedded Valkey
    python bench/serve_bench.py --model path.ckpt --size 512 --steps 50 --device cuda --out docs/benchmarks.md
    REDIS_URL=redis://127.0.0.1:6379/14 python bench/serve_bench.py ...
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Result:
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    latencies: list[float]
    overheads: list[float] | None = None  # service only: latency minus the job's run time on the worker

    @property
    def images_per_s(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def n_requests(args: argparse.Namespace, concurrency: int) -> int:
    """Requests at a concurrency level: ``--requests`` per client, at least ``--min-requests``."""
    return max(args.min_requests, args.requests * concurrency)


def run_load(mode: str, concurrency: int, requests: int, one: callable) -> Result:
    """``requests`` calls of ``one(i)`` from ``concurrency`` threads; latency per call."""
    latencies: list[float] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        t0 = time.perf_counter()
        one(i)
        dt = time.perf_counter() - t0
        with lock:
            latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(task, range(requests)))
    return Result(mode, concurrency, requests, time.perf_counter() - t0, latencies)


def bench_in_process(args: argparse.Namespace, model: Path) -> list[Result]:
    from ldm.pipeline import GenerationRow, load_pipeline

    pipe = load_pipeline(model, device=args.device, batch_invariant=args.batch_invariant)
    pipe.generate([GenerationRow(prompt="warm-up", seed=0, steps=args.steps)], args.size, args.size)

    def one(i: int) -> None:
        pipe.generate([GenerationRow(prompt=f"bench {i}", seed=i, steps=args.steps)], args.size, args.size)

    return [run_load("in-process", c, n_requests(args, c), one) for c in args.concurrency]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "launcher", *cmd], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait(pred: callable, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def bench_service(args: argparse.Namespace, model: Path, redis_url: str, logs: Path) -> tuple[list[Result], float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LDM_REDIS_URL=redis_url, LDM_REDIS_PREFIX="bench",
               LDM_MAX_BATCH_ROWS=str(args.max_batch_rows), LDM_BATCH_WINDOW_MS=str(args.batch_window_ms),
               LDM_MAX_QUEUE_DEPTH="100000", LDM_REDIS_SOCKET_TIMEOUT_S="60", LDM_MAX_WIDTH="2048", LDM_MAX_HEIGHT="2048",
               LDM_MAX_IMAGES=str(min(4, args.max_batch_rows)))
    if args.batch_invariant is not None:
        env["LDM_BATCH_INVARIANT"] = str(args.batch_invariant).lower()
    env.pop("REDIS_URL", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start(["worker", "--model", str(model), "--device", args.device], env, logs / "worker.log")
    gateway = start(["gateway", "--port", str(port)], env, logs / "gateway.log")
    # a second gateway whose jobs nobody consumes, for the pure submission rate
    sub_port = free_port()
    sub_env = dict(env, LDM_REDIS_PREFIX="benchsubmit", LDM_DEFAULT_MODEL="nobody")
    submit_gw = start(["gateway", "--port", str(sub_port)], sub_env, logs / "submit-gateway.log")
    try:
        wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 300, "the service")
        wait(lambda: httpx.get(f"http://127.0.0.1:{sub_port}/healthz", timeout=2).status_code == 200, 60, "gateway 2")
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        with httpx.Client(base_url=url, timeout=120, limits=limits) as c:
            body = {"width": args.size, "height": args.size, "steps": args.steps}
            c.post("/v1/txt2img", json={**body, "prompt": "warm"}, headers={"Prefer": "wait=60"})

            overheads: list[float] = []

            def one(i: int) -> None:
                t0 = time.perf_counter()
                r = c.post("/v1/txt2img", json={**body, "prompt": f"bench {i}", "seed": i},
                           headers={"Prefer": "wait=60"})
                job = r.json()
                if r.status_code != 200 or job["status"] != "succeeded":
                    raise RuntimeError(f"job did not finish in time: HTTP {r.status_code} {job}")
                c.get(job["images"][0]["url"]).raise_for_status()
                run_s = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"]))
                overheads.append(time.perf_counter() - t0 - run_s.total_seconds())

            results = []
            for cc in args.concurrency:
                overheads.clear()
                res = run_load("service", cc, n_requests(args, cc), one)
                res.overheads = list(overheads)
                results.append(res)
        with httpx.Client(base_url=f"http://127.0.0.1:{sub_port}", timeout=30, limits=limits) as c:
            n = args.submit_jobs

            def submit(i: int) -> None:
                c.post("/v1/txt2img", json={**body, "prompt": f"s{i}"}).raise_for_status()

            sub = run_load("submit", 8, n, submit)
        return results, n / sub.wall_s
    finally:
        for p in (gateway, submit_gw, worker):
            p.terminate()
        for p in (gateway, submit_gw, worker):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def report(args: argparse.Namespace, inproc: list[Result], service: list[Result], submit_rate: float,
           model: Path) -> str:
    lines = [
        "| mode | concurrency | requests | images/s | p50 latency (s) | p99 latency (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in [*inproc, *service]:
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.images_per_s:.2f} | {r.pct(0.5):.3f} | "
                     f"{r.pct(0.99):.3f} |")
    by_c = {r.concurrency: r for r in service}
    base = {r.concurrency: r for r in inproc}
    c1 = min(by_c)
    overhead = (by_c[c1].pct(0.5) - base[c1].pct(0.5)) / by_c[c1].pct(0.5)
    own = sorted(by_c[c1].overheads or [0.0])
    own_p50 = own[len(own) // 2]
    speedup = by_c[max(by_c)].images_per_s / by_c[c1].images_per_s
    lines += [
        "",
        f"* gateway job-submission rate: **{submit_rate:.0f} jobs/s** ({args.submit_jobs} jobs, 8 client threads, "
        "no worker consuming)",
        f"* gateway + queue overhead at concurrency {c1}, p50: **{overhead * 100:.1f}%** of end-to-end latency "
        f"(goal < 5%): service p50 vs in-process p50",
        f"* the same, measured inside the service run: client latency minus the job's run time on the worker "
        f"(queue wait, claim, HTTP, `Prefer: wait` wake-up, image download), p50 **{own_p50 * 1000:.0f} ms** = "
        f"**{own_p50 / by_c[c1].pct(0.5) * 100:.1f}%** of the p50 latency",
        f"* batching: service images/s at concurrency {max(by_c)} vs {c1}: **{speedup:.2f}x** (goal >= 2x)",
        "",
        f"Setup: model `{model.name}`, {args.size}x{args.size}, {args.steps} DDIM steps, device `{args.device}`, "
        f"max_batch_rows {args.max_batch_rows}, batch window {args.batch_window_ms} ms, "
        f"batch_invariant {'default' if args.batch_invariant is None else args.batch_invariant}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}.",
        f"Command: `python bench/serve_bench.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: a tiny random model written to a temp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=4, help="requests per client thread")
    ap.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--max-batch-rows", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=int, default=20)
    ap.add_argument("--submit-jobs", type=int, default=400)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                    help="force the pipeline's row-serial UNet on/off (default: the pipeline's choice, on for CPU)")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.model:
        model = Path(args.model)
    else:
        from worker.default_model import random_model_path

        model = random_model_path()
    from ldm_serve.embedded_redis import redis_or_embedded

    with redis_or_embedded(tmp / "valkey") as (redis_url, _):
        inproc = bench_in_process(args, model)
        service, submit_rate = bench_service(args, model, redis_url, tmp)
    text = report(args, inproc, service, submit_rate, model)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n### Run\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
