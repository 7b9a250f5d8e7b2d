"""Overload at 10x capacity: only 202s and 429s with ``Retry-After``, no 5xx, no job lost.

One worker; its capacity (jobs per second) is measured first with one full batch. Then an
open-loop client offers ten times that rate for ``DURATION_S`` seconds (each request is sent at its
scheduled time, whatever the answers to earlier ones). The queue bound is small, so most requests
are refused. The p50 / p99 / max of the submission latency are printed and written to
``tmp/results/overload.json``; they are figures, not assertions.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.reliability.support import Stack, percentile, wait_terminal, write_results

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

FACTOR = 10
DURATION_S = 20.0
MAX_RATE = 50.0  # requests per second the client offers at most (one loaded 2-core machine)
MIN_REQUESTS = 100
CLIENTS = 16
QUEUE_DEPTH = 8
JOB = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 3.0}


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_overload_at_10x_capacity_gives_only_429_with_retry_after(model_path: Path, rel_redis: str,
                                                                  tmp_path: Path) -> None:
    t_start = time.monotonic()
    (tmp_path / "logs").mkdir()
    stack = Stack.start(tmp_path / "logs", model_path, workers=1, redis_url=rel_redis, redis_prefix="overload",
                        max_queue_depth=QUEUE_DEPTH, queue_full_retry_after_s=2)
    try:
        with stack.client() as c:
            # warm the worker (first calls are slow), then capacity: one full batch (max_batch_rows
            # jobs) from submission to the last image
            warm = c.post("/v1/txt2img", json={**JOB, "prompt": "warm up"}).json()["id"]
            wait_terminal(c, [warm], 180, interval_s=0.1)
            t0 = time.monotonic()
            cal = [c.post("/v1/txt2img", json={**JOB, "prompt": f"calibrate {i}"}).json()["id"] for i in range(8)]
            wait_terminal(c, cal, 180, interval_s=0.1)
            capacity = len(cal) / (time.monotonic() - t0)
        rate = min(FACTOR * capacity, MAX_RATE)
        n = max(MIN_REQUESTS, int(rate * DURATION_S))
        results: list[tuple[int, float, str | None]] = []
        errors: list[str] = []
        lock = threading.Lock()
        clients = threading.local()

        def send(i: int, due: float) -> None:
            if not hasattr(clients, "c"):
                clients.c = httpx.Client(base_url=stack.url, timeout=60)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # open loop: the request goes at its scheduled time
            t = time.monotonic()
            try:
                r = clients.c.post("/v1/txt2img", json={**JOB, "prompt": f"overload {i}", "seed": i})
            except httpx.HTTPError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                results.append((r.status_code, time.monotonic() - t, r.headers.get("retry-after")))
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                elif r.status_code != 429:
                    errors.append(f"{r.status_code}: {r.text[:300]}")

        accepted: list[str] = []
        begin = time.monotonic() + 0.5
        with ThreadPoolExecutor(CLIENTS) as pool:
            for i in range(n):
                pool.submit(send, i, begin + i / rate)
        offered_s = time.monotonic() - begin
        wall_end = time.time()
        with stack.client() as c:
            finished = wait_terminal(c, accepted, 300)
        # throughput while overloaded: jobs that finished within the offered period
        done_in_period = sum(1 for j in finished.values() if j["finished_at"] and _epoch(j["finished_at"]) <= wall_end)
    finally:
        stack.stop()

    codes = Counter(code for code, _, _ in results)
    lat = [dt for _, dt, _ in results]
    lat_ok = [dt for code, dt, _ in results if code == 202]
    lat_429 = [dt for code, dt, _ in results if code == 429]
    bad_retry_after = [ra for code, _, ra in results if code == 429 and not (ra and ra.isdigit() and int(ra) >= 1)]
    outcomes = Counter(j["status"] for j in finished.values())

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 1) if values else float("nan")

    write_results("overload", {
        "capacity_jobs_per_s": round(capacity, 2), "offered_rate_per_s": round(rate, 2),
        "factor": round(rate / capacity, 1),
        "throughput_while_overloaded_per_s": round(done_in_period / offered_s, 2), "requests": n, "offered_s": round(offered_s, 1),
        "status_codes": {str(k): v for k, v in sorted(codes.items())}, "responses_5xx": sum(
            v for k, v in codes.items() if k >= 500), "transport_errors": len(errors) - sum(
            v for k, v in codes.items() if k not in (202, 429)),
        "retry_after_missing_or_bad": len(bad_retry_after), "accepted": len(accepted),
        "accepted_outcomes": dict(outcomes), "lost": len(accepted) - len(finished),
        "submit_latency_ms": {"p50": ms(lat, 50), "p99": ms(lat, 99), "max": ms(lat, 100)},
        "submit_latency_202_ms": {"p50": ms(lat_ok, 50), "p99": ms(lat_ok, 99)},
        "submit_latency_429_ms": {"p50": ms(lat_429, 50), "p99": ms(lat_429, 99)},
        "wall_s": round(time.monotonic() - t_start, 1),
    })

    assert not errors, errors[:5]
    assert len(results) == n
    assert set(codes) <= {202, 429}, codes
    assert codes[429] > 0, f"no request was refused at {rate:.1f}/s: the overload did not happen ({codes})"
    assert not bad_retry_after, bad_retry_after[:5]
    assert outcomes == Counter({"succeeded": len(accepted)}), outcomes
