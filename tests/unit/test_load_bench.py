"""The load bench's arrival process and report, without starting a service."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.scripts import load_script


def _bench():
    return load_script("bench/load_bench.py")


class FakeClient:
    def __init__(self, bench) -> None:
        self.bench = bench
        self.ids: list[int] = []
        self.sent_at: list[float] = []

    def one(self, i: int):
        self.ids.append(i)
        self.sent_at.append(time.perf_counter())
        if i == 3:
            raise RuntimeError("boom")
        return self.bench.Sample(e2e_s=1.0 + i / 100, compute_s=0.9, queue_s=0.05)


def test_open_loop_sends_poisson_arrivals_and_counts_failures() -> None:
    bench = _bench()
    client = FakeClient(bench)
    samples, failed = bench.open_loop(client, rate=200.0, duration_s=0.25, seed=1, first_id=0)
    assert failed == 1 and len(samples) == len(client.ids) - 1
    assert 20 <= len(client.ids) <= 100  # ~50 expected arrivals
    again = FakeClient(bench)
    bench.open_loop(again, rate=200.0, duration_s=0.25, seed=1, first_id=0)
    assert sorted(again.ids) == sorted(client.ids)  # the arrival process is seeded


def test_report_gives_overhead_share_percentiles_per_mode() -> None:
    bench = _bench()
    args = argparse.Namespace(size=64, steps=4, guidance=5.0, output_format="jpeg", device="cpu", backend="auto",
                              max_batch_rows=8, batch_window_ms=50, rate=None, load=0.5, duration=10.0, seed=0, burst=4, threads=1)
    fast = bench.ModeResult("continuous", unloaded=[bench.Sample(1.0, 0.95, 0.0)], capacity_jobs_s=2.0,
                            rate_jobs_s=1.0, loaded=[bench.Sample(1.0, 0.95, 0.01) for _ in range(10)])
    slow = bench.ModeResult("request", unloaded=[bench.Sample(1.0, 0.95, 0.0)], capacity_jobs_s=2.0,
                            rate_jobs_s=1.0, loaded=[bench.Sample(2.0, 1.0, 1.0) for _ in range(10)])
    text = bench.report(args, [fast, slow, bench.ModeResult("request")], Path("m.ckpt"))
    rows = [line for line in text.splitlines() if line.startswith("| continuous") or line.startswith("| request")]
    assert "**5.0%**" in rows[0] and "**50.0%**" in rows[1] and "2.00x" in rows[1]
    assert rows[2].count("- |") == 7  # a mode without samples
    assert bench.pct([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and bench.pct([1.0, 2.0], 0.99) == 2.0
