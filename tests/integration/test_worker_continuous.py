"""The worker in continuous-batching mode on a real Redis, with a small fake model behind the real engine.

The fake model (see tests/unit/test_engine.py) is row-wise and takes milliseconds per
step, so these tests drive the worker loop one iteration (= one DDIM step) at a time.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest

from ldm.noise_schedule import ddim_timesteps
from ldm.sampling.rows import PreparedRow
from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, Priority, new_job_id
from ldm_serve.jobstore import JobStore
from ldm_serve.settings import Settings
from tests.serving_support import FakeRow, redis_for_tests, require_redis
from tests.unit.test_engine import FakeModel, Req
from worker.batching import Candidate, select_in_order
from worker.main import Worker

pytestmark = pytest.mark.integration


class FakeServingModel(FakeModel):
    """The fake engine model with the attributes and row type the worker uses."""

    name = "fake"
    untrained = True
    downsample_factor = 8
    default_size = 64
    max_prompt_tokens = 77
    inpaint_mode = "blend"

    def __init__(self) -> None:
        super().__init__()
        self.validated: list[int] = []  # seeds of the rows validate_row saw, in order

    @staticmethod
    def _req(row: FakeRow) -> Req:
        return Req(seed=row.seed, steps=row.steps, scale=row.guidance_scale, eta=row.eta,
                   bad="BAD" in row.prompt, explode="EXPLODE" in row.prompt)

    def step_count(self, steps: int) -> int:
        return len(ddim_timesteps(steps))

    def validate_row(self, row: FakeRow, width: int, height: int) -> None:
        self.validated.append(row.seed)
        super().validate_row(self._req(row), width, height)

    def effective_guidance(self, row: FakeRow) -> float:
        return row.guidance_scale

    def prepare_row(self, row: FakeRow, width: int, height: int) -> PreparedRow:
        return super().prepare_row(self._req(row), width, height)

    def finish_images(self, rows: Sequence[FakeRow], latents: torch.Tensor) -> list[Image.Image]:
        # a deterministic picture of the final latent: any change in the latent changes the image
        arr = ((latents[:, :3].clamp(-3, 3) + 3) / 6 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@pytest.fixture
def settings() -> Settings:
    url = redis_for_tests()
    require_redis(url)
    return Settings(
        redis_url=url, redis_prefix="wtc", max_batch_rows=4, warmup=False, batching="continuous",
        heartbeat_interval_s=0.2, heartbeat_ttl_s=0.5, queue_ttl_s=60,
    )


def make_worker(settings: Settings) -> Worker:
    return Worker(FakeServingModel(), settings, CollectorRegistry(), row_factory=FakeRow)


def submit(store: JobStore, prompt: str = "a cat", *, n: int = 1, steps: int = 10, size: int = 64, seed: int = 1,
           scale: float = 5.0, eta: float = 0.0, priority: Priority = Priority.NORMAL) -> str:
    payload = GenerationPayload(
        job_id=new_job_id(), kind=JobKind.TXT2IMG, model="fake", prompt=prompt, n=n, width=size, height=size,
        steps=steps, guidance_scale=scale, eta=eta, seeds=[seed + i for i in range(n)], priority=priority,
        created_at=time.time(),
    )
    return store.submit(payload)[0]


def rec(store: JobStore, job_id: str) -> dict[str, str]:
    return store.get(job_id)


def status(store: JobStore, job_id: str) -> str:
    return rec(store, job_id)["status"]


def image(store: JobStore, job_id: str, i: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.redis.get(store.keys.image(job_id, i)))))


def drain(worker: Worker, limit: int = 500) -> int:
    """Iterate until nothing is queued or running; returns the iterations taken."""
    for n in range(limit):
        if worker.continuous.idle and not any(worker.store.queue_depth(["fake"]).values()):
            return n
        worker._iteration()
    raise AssertionError("the worker did not drain")


def test_select_in_order_stops_at_a_foreign_or_too_big_job() -> None:
    c = [Candidate("a", "k", 1), Candidate("b", "k", 2), Candidate("x", "other", 1), Candidate("d", "k", 1)]
    assert [x.job_id for x in select_in_order("k", 8, c)] == ["a", "b"]
    assert [x.job_id for x in select_in_order("k", 2, c)] == ["a"]  # b does not fit: nothing behind it either


def test_a_job_submitted_while_another_runs_starts_before_it_finishes_with_identical_images(
    settings: Settings,
) -> None:
    # references: each job alone
    solo = make_worker(settings)
    ref_long = submit(solo.store, "long", steps=20, seed=3, eta=0.5)
    drain(solo)
    ref_short = submit(solo.store, "short", steps=4, seed=9, scale=1.0)
    drain(solo)

    worker = make_worker(settings)
    store = worker.store
    long_job = submit(store, "long", steps=20, seed=3, eta=0.5)
    for _ in range(5):
        worker._iteration()
    assert status(store, long_job) == "running" and int(rec(store, long_job)["step"]) == 5
    short_job = submit(store, "short", steps=4, seed=9, scale=1.0)
    worker._iteration()  # the short job joins at the next step boundary
    assert status(store, short_job) == "running" and int(rec(store, short_job)["step"]) == 1
    for _ in range(3):
        worker._iteration()
    assert status(store, short_job) == "succeeded" and status(store, long_job) == "running"
    drain(worker)
    assert status(store, long_job) == "succeeded"
    np.testing.assert_array_equal(image(store, long_job), image(store, ref_long))
    np.testing.assert_array_equal(image(store, short_job), image(store, ref_short))
    batch_long, batch_short = (json.loads(rec(store, j)["batch"]) for j in (long_job, short_job))
    assert batch_long["id"] == batch_short["id"] and batch_long["jobs"] == 2 and batch_long["mode"] == "continuous"
    assert json.loads(rec(store, ref_long)["batch"])["jobs"] == 1


def test_jobs_wait_in_the_queue_until_rows_free_up(settings: Settings) -> None:
    worker = make_worker(settings)  # max_batch_rows = 4
    store = worker.store
    first = submit(store, "first", n=3, steps=8)
    worker._iteration()
    second = submit(store, "second", n=2, steps=4)  # 3 + 2 > 4: stays queued
    third = submit(store, "third", n=1, steps=4)  # fits, but may not overtake "second"
    worker._iteration()
    assert status(store, second) == "queued" and status(store, third) == "queued"
    assert store.queue_position(second, "fake", "normal") == 0
    for _ in range(7):
        worker._iteration()
    assert status(store, first) == "succeeded"
    worker._iteration()
    assert status(store, second) == status(store, third) == "running"
    drain(worker)
    assert {status(store, j) for j in (first, second, third)} == {"succeeded"}


def test_another_size_waits_for_the_running_batch_then_runs(settings: Settings) -> None:
    worker = make_worker(settings)
    store = worker.store
    a = submit(store, "a", steps=5)
    worker._iteration()
    big = submit(store, "big", size=128, steps=4)
    late = submit(store, "late same size", steps=4)  # behind a job of another size: not taken
    worker._iteration()
    assert status(store, big) == status(store, late) == "queued"
    drain(worker)
    started = {j: float(rec(store, j)["started_at"]) for j in (a, big, late)}
    assert started[a] < started[big] < started[late]
    assert {status(store, j) for j in (a, big, late)} == {"succeeded"}


def test_cancel_and_timeout_drop_only_those_jobs(settings: Settings) -> None:
    worker = make_worker(settings)
    store = worker.store
    keep = submit(store, "keep", steps=10)
    victim = submit(store, "victim", steps=10)
    slow = submit(store, "slow", steps=10)
    for _ in range(2):
        worker._iteration()
    assert store.cancel(victim) is JobStatus.RUNNING
    worker.continuous.jobs[slow].started -= 10_000  # ran "too long"
    worker._iteration()
    assert status(store, victim) == "canceled" and int(rec(store, victim)["step"]) < 10
    assert status(store, slow) == "failed" and json.loads(rec(store, slow)["error"])["type"] == "timeout"
    assert worker.continuous.engine.groups == [keep]
    drain(worker)
    assert status(store, keep) == "succeeded"
    assert store.redis.get(store.keys.image(victim, 0)) is None
    assert not store.redis.smembers(store.keys.worker_jobs(worker.name))


def test_a_bad_or_failing_job_fails_alone(settings: Settings) -> None:
    worker = make_worker(settings)
    store = worker.store
    good = submit(store, "fine", steps=8, eta=0.7)
    bad = submit(store, "BAD prompt")
    worker._iteration()
    boom = submit(store, "EXPLODE", steps=8)
    drain(worker)
    assert status(store, good) == "succeeded"
    assert status(store, bad) == "failed" and json.loads(rec(store, bad)["error"])["field"] == "prompt"
    assert status(store, boom) == "failed" and "simulated" in json.loads(rec(store, boom)["error"])["message"]
    alone = make_worker(settings.model_copy(update={"redis_prefix": "wtc2"}))
    ref = submit(alone.store, "fine", steps=8, eta=0.7)
    drain(alone)
    np.testing.assert_array_equal(image(store, good), image(alone.store, ref))


def test_stop_drains_the_running_batch_and_takes_nothing_new(settings: Settings) -> None:
    worker = make_worker(settings)
    store = worker.store
    running = submit(store, "running", steps=6)
    worker._iteration()
    worker.request_stop()
    queued = submit(store, "queued")
    while worker._draining():
        worker._iteration()
    assert status(store, running) == "succeeded" and status(store, queued) == "queued"


def test_engine_metrics_are_exported(settings: Settings) -> None:
    worker = make_worker(settings)
    submit(worker.store, "m", n=2, steps=4, scale=1.0)
    drain(worker)
    text = generate_latest(worker.metrics.registry).decode()
    assert 'ldm_engine_admitted_rows_total{model="fake"} 2.0' in text
    assert 'ldm_engine_running_rows{model="fake"} 0.0' in text
    for name in ("ldm_engine_step_seconds_count", "ldm_queue_to_first_step_seconds_count",
                 "ldm_engine_padded_rows_total", "ldm_batch_size_rows_count", "ldm_denoise_step_seconds_count"):
        assert name in text


def test_each_row_is_validated_once_by_the_engine(settings: Settings) -> None:
    worker = make_worker(settings)
    good = submit(worker.store, "fine", n=2, seed=5)
    bad = submit(worker.store, "BAD prompt", seed=30)
    drain(worker)
    assert worker.pipeline.validated == [5, 6, 30]  # engine.add validates; JobBook.prepare does not repeat it
    assert status(worker.store, good) == "succeeded"
    err = json.loads(rec(worker.store, bad)["error"])
    assert err["type"] == "invalid_input" and err["field"] == "prompt"
