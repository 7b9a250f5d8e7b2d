"""Worker logic (request batching, isolation, cancel, recovery) on a real Redis with a stand-in pipeline.

Continuous batching (the default) has its own tests in tests/integration/test_worker_continuous.py.

The stand-in keeps these tests torch-free and fast; the real model runs in tests/integration.
"""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import CollectorRegistry

from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, Priority, new_job_id
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.settings import Settings
from tests.serving_support import FakePipeline, FakeRow, redis_for_tests, require_redis
from worker.main import Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def settings() -> Settings:
    url = redis_for_tests()
    require_redis(url)
    return Settings(
        redis_url=url, redis_prefix="wt", batch_window_ms=0, max_batch_rows=8, warmup=False, batching="request",
        heartbeat_interval_s=0.2, heartbeat_ttl_s=0.5, max_attempts=2, queue_ttl_s=60,
    )


def make_worker(settings: Settings, pipe: FakePipeline | None = None) -> Worker:
    return Worker(pipe or FakePipeline(), settings, CollectorRegistry(), row_factory=FakeRow)


def submit(store: JobStore, prompt: str = "a cat", *, n: int = 1, steps: int = 3, size: int = 64,
           seed: int = 1, priority: Priority = Priority.NORMAL, model: str = "fake") -> str:
    payload = GenerationPayload(
        job_id=new_job_id(), kind=JobKind.TXT2IMG, model=model, prompt=prompt, n=n, width=size, height=size,
        steps=steps, guidance_scale=5.0, seeds=[seed + i for i in range(n)], priority=priority,
        created_at=time.time(),
    )
    return store.submit(payload)[0]


def drain(worker: Worker) -> None:
    """Run batches until the queues are empty."""
    while any(worker.store.queue_depth(["fake"]).values()):
        worker._one_batch()


def status(store: JobStore, job_id: str) -> str:
    return store.get(job_id)["status"]


def test_compatible_jobs_share_one_generate_call(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings, pipe)
    store = worker.store
    ids = [submit(store, f"prompt {i}", n=2, steps=2 + i, seed=10 * i) for i in range(3)]
    other = submit(store, "other size", size=128)
    drain(worker)
    assert pipe.calls == [6, 1]  # 3 jobs x 2 rows together; the 128px job alone
    for i, job_id in enumerate(ids):
        rec = store.get(job_id)
        assert rec["status"] == "succeeded"
        assert int(rec["step"]) == int(rec["total"]) == 2 + i
        assert json.loads(rec["batch"])["rows"] == 6
        assert store.redis.get(store.keys.image(job_id, 1)) is not None
    assert status(store, other) == "succeeded"


def test_batch_respects_max_rows(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings.model_copy(update={"max_batch_rows": 4}), pipe)
    for i in range(3):
        submit(worker.store, f"p{i}", n=2)
    drain(worker)
    assert pipe.calls == [4, 2]


def test_invalid_job_fails_alone(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings, pipe)
    good = submit(worker.store, "fine")
    bad = submit(worker.store, "BAD prompt")
    drain(worker)
    assert status(worker.store, good) == "succeeded"
    rec = worker.store.get(bad)
    assert rec["status"] == "failed"
    assert json.loads(rec["error"])["field"] == "prompt"
    assert pipe.calls == [1]


def test_batch_failure_is_isolated_by_rerunning_jobs_alone(settings: Settings) -> None:
    worker = make_worker(settings)
    good = submit(worker.store, "fine")
    boom = submit(worker.store, "EXPLODE")
    drain(worker)
    assert status(worker.store, good) == "succeeded"
    assert status(worker.store, boom) == "failed"
    assert "simulated" in json.loads(worker.store.get(boom)["error"])["message"]


def test_cancel_flag_drops_only_that_jobs_rows(settings: Settings) -> None:
    worker = make_worker(settings)
    store = worker.store
    keep = submit(store, "keep", n=2, steps=6)
    victim = submit(store, "victim", n=2, steps=6)
    original = worker.runner._on_step

    def on_step(progress, owner):  # the client cancels while step 2 runs
        if progress[0].step == 2:
            assert store.cancel(victim) is JobStatus.RUNNING
        return original(progress, owner)

    worker.runner._on_step = on_step  # type: ignore[method-assign]
    drain(worker)
    assert status(store, keep) == "succeeded"
    rec = store.get(victim)
    assert rec["status"] == "canceled"
    assert int(rec["step"]) < 6
    assert store.redis.get(store.keys.image(victim, 0)) is None


def test_cancel_while_queued_never_runs(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings, pipe)
    job = submit(worker.store)
    assert worker.store.cancel(job) is JobStatus.CANCELED
    drain(worker)
    assert pipe.calls == []
    assert status(worker.store, job) == "canceled"


def test_priority_order(settings: Settings) -> None:
    worker = make_worker(settings.model_copy(update={"max_batch_rows": 1}))
    low = submit(worker.store, priority=Priority.LOW)
    high = submit(worker.store, priority=Priority.HIGH)
    worker._one_batch()
    assert status(worker.store, high) == "succeeded"
    assert status(worker.store, low) == "queued"


def test_dead_worker_jobs_are_requeued_then_failed(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    job = submit(store)
    for attempt in (1, 2):
        dead = make_worker(settings)
        dead.store.register_worker(dead.info())
        assert dead.collector.pop_next(1) == job
        assert store.claim(job, dead.name)
        store.redis.delete(store.keys.heartbeat(dead.name))  # the process "died"
        assert store.recover_dead_workers() == [job]
        rec = store.get(job)
        if attempt == 1:
            assert rec["status"] == "queued" and "stopped heartbeating" in rec["requeued_reason"]
            assert store.queue_position(job, "fake", "normal") == 0
        else:
            assert rec["status"] == "failed"
            assert json.loads(rec["error"])["type"] == "worker_lost"
    assert store.live_workers() == []


def test_stale_queued_job_expires(settings: Settings) -> None:
    worker = make_worker(settings.model_copy(update={"queue_ttl_s": 1}))
    job = submit(worker.store)
    worker.store.redis.hset(worker.store.keys.job(job), "created_at", repr(time.time() - 5))
    assert worker.store.expire_if_stale(job, worker.store.get(job))
    assert status(worker.store, job) == "expired"


def test_job_taken_but_never_claimed_is_recovered(settings: Settings) -> None:
    """A worker that dies right after popping a job (before claiming it) loses nothing:
    the pop put the job into the worker's running set in the same atomic step."""
    worker = make_worker(settings)
    store = worker.store
    first, second = submit(store, "first"), submit(store, "second")
    assert worker.collector.pop_next(timeout_s=1) == first
    assert worker.collector.gather(store.get(first)["bkey"], 7, window_s=0.0) == [second]
    assert sum(store.queue_depth(["fake"]).values()) == 0
    members = {m.decode() for m in store.redis.smembers(store.keys.worker_jobs(worker.name))}
    assert members == {first, second}
    # the worker "dies" here, before claiming either job
    assert set(store.recover_jobs_of(worker.name)) == {first, second}
    assert status(store, first) == status(store, second) == "queued"
    assert sum(store.queue_depth(["fake"]).values()) == 2
    # and a healthy worker then runs both
    drain(make_worker(settings))
    assert status(store, first) == status(store, second) == "succeeded"


def test_job_canceled_between_pop_and_claim_is_canceled_not_run(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings, pipe)
    store = worker.store
    job = submit(store, "soon canceled")
    assert worker.collector.pop_next(timeout_s=1) == job
    store.cancel(job)  # queued but in no queue: the flag is left for the worker
    worker.runner.run([job])
    assert status(store, job) == "canceled" and pipe.calls == []
    assert not store.redis.sismember(store.keys.worker_jobs(worker.name), job)


def test_each_row_is_validated_once_and_built_from_the_payload(settings: Settings) -> None:
    pipe = FakePipeline()
    worker = make_worker(settings, pipe)
    jobs = [submit(worker.store, "first", n=2, seed=4), submit(worker.store, "second", steps=5)]
    drain(worker)
    assert pipe.calls == [3]
    assert pipe.validated == ["first", "first", "second"]  # by JobBook.prepare; generate is told not to repeat it
    assert [status(worker.store, j) for j in jobs] == ["succeeded", "succeeded"]
    assert int(worker.store.get(jobs[1])["total"]) == 5  # the row got the payload's steps
