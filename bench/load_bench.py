"""Serving under load: open-loop Poisson arrivals, continuous vs request batching.

For each batching mode (``LDM_BATCHING=continuous`` and ``request``) the bench starts
a real gateway and one worker on their own Redis prefix, then:

1. **unloaded**: ``--unloaded`` requests one after another (the latency of a request
   that never waits);
2. **capacity**: a burst of ``--burst`` requests submitted at once; capacity =
   requests / time until the last one finished (jobs/s, the saturated throughput);
3. **load**: open-loop Poisson arrivals at ``--load`` x capacity (default 50%) for
   ``--duration`` seconds. Arrivals never wait for completions. Each request is
   ``POST /v1/txt2img`` with ``Prefer: wait=60`` (then polling if needed) and a
   ``GET`` of the image bytes.

Per request: end-to-end (E2E) = submit -> image received, on the client;
compute = the job's run time on the worker (``finished_at - started_at``: the
denoising steps it took part in, its decode and storage); overhead share =
(E2E - compute) / E2E, i.e. queueing, gateway, Redis and HTTP as a share of what
the client waited. The report gives its p50 and p99 for both modes (goal with
continuous batching: p50 <= 10%, p99 <= 25%), and, because sharing steps with
other rows makes a job's own compute longer on a device without batching gains
(the CPU's row-serial UNet), E2E relative to the unloaded latency as well.

Usage::

    python bench/load_bench.py                                   # bundled model if installed, else tiny random
    python bench/load_bench.py --model path.ckpt --steps 20 --duration 300 --out docs/benchmarks.md
    python bench/load_bench.py --duration 5 --burst 4 --unloaded 2 --steps 4 --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_bench import free_port, start, wait  # noqa: E402 - the process helpers of the service bench

TERMINAL = {"succeeded", "failed", "canceled", "expired"}
MODES = ("continuous", "request")


@dataclass
class Sample:
    e2e_s: float
    compute_s: float
    queue_s: float

    @property
    def overhead_share(self) -> float:
        return max(0.0, self.e2e_s - self.compute_s) / self.e2e_s


@dataclass
class ModeResult:
    mode: str
    unloaded: list[Sample] = field(default_factory=list)
    capacity_jobs_s: float = 0.0
    rate_jobs_s: float = 0.0
    loaded: list[Sample] = field(default_factory=list)
    failed: int = 0
    wall_s: float = 0.0


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


class Client:
    """One request = submit, wait for the job, download its image."""

    def __init__(self, url: str, body: dict) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        self.http = httpx.Client(base_url=url, timeout=120, limits=limits)
        self.body = body

    def one(self, i: int) -> Sample:
        t0 = time.perf_counter()
        r = self.http.post("/v1/txt2img", json={**self.body, "prompt": f"load bench {i}", "seed": i},
                           headers={"Prefer": "wait=60"})
        r.raise_for_status()
        job = r.json()
        while job["status"] not in TERMINAL:
            time.sleep(0.02)
            job = self.http.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
        self.http.get(job["images"][0]["url"]).raise_for_status()
        e2e = time.perf_counter() - t0
        started, finished = datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"])
        created = datetime.fromisoformat(job["created_at"])
        return Sample(e2e, (finished - started).total_seconds(), (started - created).total_seconds())

    def close(self) -> None:
        self.http.close()


def open_loop(client: Client, rate: float, duration_s: float, seed: int, first_id: int) -> tuple[list[Sample], int]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; waits for every request to end."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    samples: list[Sample] = []
    failures = [0]
    lock = threading.Lock()

    def task(i: int) -> None:
        try:
            s = client.one(first_id + i)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            print(f"  request {i} failed: {exc}", file=sys.stderr)
            with lock:
                failures[0] += 1
            return
        with lock:
            samples.append(s)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=256) as pool:
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(task, i)
    return samples, failures[0]


def bench_mode(mode: str, args: argparse.Namespace, model: Path, redis_url: str, logs: Path) -> ModeResult:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LDM_REDIS_URL=redis_url, LDM_REDIS_PREFIX=f"loadbench-{mode}",
               LDM_BATCHING=mode, LDM_MAX_BATCH_ROWS=str(args.max_batch_rows),
               LDM_BATCH_WINDOW_MS=str(args.batch_window_ms), LDM_MAX_QUEUE_DEPTH="100000",
               LDM_REDIS_SOCKET_TIMEOUT_S="60", LDM_MAX_IMAGES="1", LDM_MAX_STEPS=str(max(150, args.steps)),
               LDM_BACKEND=args.backend)
    env.pop("REDIS_URL", None)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start(["worker", "--model", str(model), "--device", args.device], env, logs / f"worker-{mode}.log")
    gateway = start(["gateway", "--port", str(port)], env, logs / f"gateway-{mode}.log")
    result = ModeResult(mode)
    try:
        wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 600, f"the {mode} service")
        size = args.size or httpx.get(f"{url}/v1/models").json()["data"][0]["default_size"] or 64
        body = {"width": size, "height": size, "steps": args.steps, "guidance_scale": args.guidance,
                "output_format": args.output_format}
        client = Client(url, body)
        try:
            client.one(10**6)  # warm-up
            result.unloaded = [client.one(10**6 + 1 + i) for i in range(args.unloaded)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.burst) as pool:
                list(pool.map(client.one, range(2 * 10**6, 2 * 10**6 + args.burst)))
            result.capacity_jobs_s = args.burst / (time.perf_counter() - t0)
            result.rate_jobs_s = args.rate or args.load * result.capacity_jobs_s
            print(f"[{mode}] unloaded p50 {pct([s.e2e_s for s in result.unloaded], 0.5):.3f}s, capacity "
                  f"{result.capacity_jobs_s:.2f} jobs/s; load {result.rate_jobs_s:.2f} jobs/s for {args.duration}s",
                  file=sys.stderr)
            t0 = time.perf_counter()
            result.loaded, result.failed = open_loop(client, result.rate_jobs_s, args.duration, args.seed, 0)
            result.wall_s = time.perf_counter() - t0
        finally:
            client.close()
    finally:
        for p in (gateway, worker):
            p.terminate()
        for p in (gateway, worker):
            try:
                p.wait(120)
            except Exception:  # noqa: BLE001 - last resort
                p.kill()
    return result


def report(args: argparse.Namespace, results: list[ModeResult], model: Path) -> str:
    lines = [
        "| batching | capacity (jobs/s) | offered load (jobs/s) | requests | failed | overhead share p50 | "
        "overhead share p99 | E2E p50 (s) | E2E p99 (s) | E2E / unloaded p50 | E2E / unloaded p99 | "
        "queue wait p50 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.loaded:
            lines.append(f"| {r.mode} | {r.capacity_jobs_s:.2f} | {r.rate_jobs_s:.2f} | 0 | {r.failed} |"
                         + " - |" * 7)
            continue
        base = pct([s.e2e_s for s in r.unloaded], 0.5) if r.unloaded else float("nan")
        share = [s.overhead_share for s in r.loaded]
        e2e = [s.e2e_s for s in r.loaded]
        lines.append(
            f"| {r.mode} | {r.capacity_jobs_s:.2f} | {r.rate_jobs_s:.2f} | {len(r.loaded)} | {r.failed} | "
            f"**{pct(share, 0.5) * 100:.1f}%** | **{pct(share, 0.99) * 100:.1f}%** | {pct(e2e, 0.5):.3f} | "
            f"{pct(e2e, 0.99):.3f} | {pct(e2e, 0.5) / base:.2f}x | {pct(e2e, 0.99) / base:.2f}x | "
            f"{pct([s.queue_s for s in r.loaded], 0.5):.3f} |"
        )
    rate_text = f"{args.rate:.2f} jobs/s" if args.rate else f"{args.load:.0%} of each mode's measured capacity"
    lines += [
        "",
        "Overhead share = (E2E - compute) / E2E per request, compute = the job's run time on the worker "
        "(`finished_at - started_at`); goal with continuous batching: p50 <= 10%, p99 <= 25%. "
        "E2E / unloaded compares with the median latency of a request sent alone.",
        "",
        f"Setup: model `{model.name}`, {args.size or 'default'} px, {args.steps} DDIM steps, guidance "
        f"{args.guidance}, {args.output_format}, device `{args.device}`, backend `{args.backend}`, max_batch_rows {args.max_batch_rows}, "
        f"request-mode window {args.batch_window_ms} ms, open-loop Poisson arrivals at "
        f"{rate_text} "
        f"for {args.duration} s (seed {args.seed}); capacity from a burst of {args.burst}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, worker threads "
        f"{args.threads or 'default'}; python {platform.python_version()}.",
        f"Command: `python bench/load_bench.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines)


def default_model(tmp: Path) -> Path:
    """The bundled model, else the cached tiny random one (``worker.default_model``)."""
    from worker.default_model import default_model as resolve

    model = resolve()
    if model.untrained:
        print("no bundled model installed: using a tiny random model", file=sys.stderr)
    return model.path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the bundled model, else a tiny random one)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="continuous,request")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="LDM_BACKEND of the worker (auto: torchscript on CPU)")
    ap.add_argument("--size", type=int, help="image side (default: the model's default size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--output-format", default="jpeg", choices=["png", "jpeg", "webp"])
    ap.add_argument("--load", type=float, default=0.5, help="offered load as a fraction of measured capacity")
    ap.add_argument("--rate", type=float, help="fixed arrival rate (jobs/s) instead of --load x capacity")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per mode")
    ap.add_argument("--burst", type=int, default=16, help="requests in the capacity burst")
    ap.add_argument("--unloaded", type=int, default=5, help="sequential requests for the unloaded latency")
    ap.add_argument("--max-batch-rows", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=int, default=50, help="request mode's gathering window")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of the worker (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    ap.add_argument("--out", type=Path, help="append the Markdown report to this file")
    args = ap.parse_args()
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")

    tmp = Path(tempfile.mkdtemp(prefix="load-bench-"))
    model = Path(args.model) if args.model else default_model(tmp)
    from ldm_serve.embedded_redis import redis_or_embedded

    with redis_or_embedded(tmp / "valkey") as (redis_url, _):
        results = [bench_mode(mode, args, model, redis_url, tmp) for mode in args.modes]
    text = report(args, results, model)
    print(text)
    print(f"(logs in {tmp})", file=sys.stderr)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n### Serving under load\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
