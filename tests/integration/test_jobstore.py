"""The job store (ldm_serve/jobstore.py) against a real Redis, with no gateway or worker around it:
submission, idempotency, queue bound and positions, claim and transitions, cancel, the worker registry."""

from __future__ import annotations

import json
import time

import pytest

from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, Priority, WorkerInfo, new_job_id
from ldm_serve.errors import InvalidInput, JobNotFound, QueueFull
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.settings import Settings
from tests.serving_support import redis_for_tests, require_redis

pytestmark = pytest.mark.integration

PREFIX = "jst"


@pytest.fixture
def store() -> JobStore:
    url = redis_for_tests()
    client = require_redis(url)
    for key in client.scan_iter(f"{PREFIX}:*"):
        client.delete(key)
    for key in client.scan_iter(f"rq:*{PREFIX}-*"):
        client.delete(key)
    settings = Settings(redis_url=url, redis_prefix=PREFIX, max_queue_depth=3, heartbeat_ttl_s=2,
                        heartbeat_interval_s=0.5)
    return JobStore(connect(settings), settings)


def payload(priority: Priority = Priority.NORMAL, model: str = "m") -> GenerationPayload:
    return GenerationPayload(job_id=new_job_id(), kind=JobKind.TXT2IMG, model=model, prompt="p", n=1, width=64,
                             height=64, steps=2, guidance_scale=5.0, seeds=[1], priority=priority,
                             created_at=time.time())


def events(store: JobStore, job_id: str) -> list[tuple[str, dict]]:
    return [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in store.redis.xrange(store.keys.events(job_id))]


def test_submit_records_queues_and_announces_the_job(store: JobStore) -> None:
    p = payload()
    job_id, created = store.submit(p)
    assert created and job_id == p.job_id
    rec = store.get(job_id)
    assert rec["status"] == "queued" and rec["model"] == "m" and rec["bkey"] == "m|64x64"
    assert store.payload(job_id) == p
    assert events(store, job_id) == [("status", {"status": "queued"})]
    assert store.queue_depth(["m"])[f"{PREFIX}-m-normal"] == 1
    assert store.queue_position(job_id, "m", "normal") == 0
    with pytest.raises(JobNotFound):
        store.get(new_job_id())


def test_queue_positions_count_higher_priorities_first(store: JobStore) -> None:
    low, normal, high = payload(Priority.LOW), payload(), payload(Priority.HIGH)
    for p in (low, normal, high):
        store.submit(p)
    assert store.queue_position(high.job_id, "m", "high") == 0
    assert store.queue_position(normal.job_id, "m", "normal") == 1
    assert store.queue_position(low.job_id, "m", "low") == 2


def test_the_queue_bound_refuses_with_retry_after(store: JobStore) -> None:
    for _ in range(3):
        store.submit(payload())
    with pytest.raises(QueueFull) as info:
        store.submit(payload())
    assert info.value.retry_after_s == store.settings.queue_full_retry_after_s


def test_idempotency_key_returns_the_first_job_and_refuses_another_body(store: JobStore) -> None:
    first, created = store.submit(payload(), idempotency_key="k1", fingerprint="body-a")
    again, created_again = store.submit(payload(), idempotency_key="k1", fingerprint="body-a")
    assert created and not created_again and again == first
    with pytest.raises(InvalidInput, match="Idempotency-Key"):
        store.submit(payload(), idempotency_key="k1", fingerprint="body-b")
    assert store.queue_depth(["m"])[f"{PREFIX}-m-normal"] == 1


def test_claim_and_transitions_are_checked_and_evented(store: JobStore) -> None:
    job_id, _ = store.submit(payload())
    assert store.claim(job_id, "w1", batch={"id": "b1"})
    assert not store.claim(job_id, "w2")  # no longer queued
    rec = store.get(job_id)
    assert rec["status"] == "running" and rec["worker"] == "w1" and rec["attempts"] == "1"
    assert store.redis.sismember(store.keys.worker_jobs("w1"), job_id)
    assert not store.transition(job_id, [JobStatus.QUEUED], JobStatus.CANCELED)  # wrong current status
    assert store.transition(job_id, [JobStatus.RUNNING], JobStatus.SUCCEEDED, {"finished_at": "1"})
    assert store.get(job_id)["status"] == "succeeded"
    assert [d["status"] for t, d in events(store, job_id) if t == "status"] == ["queued", "running", "succeeded"]
    assert 0 < store.redis.ttl(store.keys.job(job_id)) <= store.settings.result_ttl_s  # the result TTL started
    assert store.cancel(job_id) is JobStatus.SUCCEEDED  # terminal: unchanged


def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_one_a_flag(store: JobStore) -> None:
    queued, _ = store.submit(payload())
    assert store.cancel(queued) is JobStatus.CANCELED
    assert store.queue_position(queued, "m", "normal") is None
    running, _ = store.submit(payload())
    assert store.claim(running, "w1")
    assert store.cancel(running) is JobStatus.RUNNING
    assert store.get(running)["cancel_requested"] == "1" and store.redis.get(store.keys.cancel(running)) == b"1"


def test_worker_registry_and_recovery_of_a_dead_worker(store: JobStore) -> None:
    info = WorkerInfo(name="w1", model="m", max_batch_rows=4, pid=123, host="h", started_at=time.time())
    store.register_worker(info)
    assert [w.name for w in store.live_workers()] == ["w1"] and store.known_models() == ["m"]
    job_id, _ = store.submit(payload())
    assert store.claim(job_id, "w1")
    assert store.expire_workers_of_process("h", 999) == []
    assert store.expire_workers_of_process("h", 123) == ["w1"]  # known dead: its heartbeat goes now
    assert store.live_workers() == []
    assert store.recover_dead_workers() == [job_id]
    assert store.get(job_id)["status"] == "queued" and store.queue_position(job_id, "m", "normal") == 0
    store.heartbeat(info)  # a starved worker that comes back re-registers
    assert [w.name for w in store.live_workers()] == ["w1"]
    store.deregister_worker("w1")
    assert store.live_workers() == []


def test_supervisor_notes(store: JobStore) -> None:
    store.set_supervisor_note("worker", "restarting after exit code -9, attempt 2")
    store.set_supervisor_note("gateway", "restarting")
    assert store.supervisor_notes() == ["restarting", "restarting after exit code -9, attempt 2"]
    store.set_supervisor_note("gateway", None)
    assert store.supervisor_notes() == ["restarting after exit code -9, attempt 2"]
    store.clear_supervisor_notes()
    assert store.supervisor_notes() == []


def test_reads_refuse_malformed_ids_before_redis() -> None:
    """(moved from tests/unit/test_gateway_hardening.py: it needs a real Redis)"""
    url = redis_for_tests()
    client = require_redis(url)
    settings = Settings(redis_url=url, redis_prefix="hard")
    store = JobStore(connect(settings), settings)
    job_id = new_job_id()
    # A key of the wrong type where a malformed id would point: reaching Redis would be WRONGTYPE.
    client.xadd(f"hard:job:{job_id}:events", {"type": "status", "data": "{}"})
    for read in (store.get, store.payload, store.webhook_attempts, store.cancel):
        with pytest.raises(JobNotFound, match="not a job id"):
            read(f"{job_id}:events")
    with pytest.raises(JobNotFound):
        store.queue_position(f"{job_id}:events", "m", "normal")


def test_a_submission_lost_at_exec_leaves_no_idempotency_key(store: JobStore, monkeypatch) -> None:
    """Redis lost between recording the Idempotency-Key and creating the job used to leave the key
    pointing at no job, so the client's retry got a 404 until the key expired (issue 10, found by
    the reliability suite). The key is now written in the job's own MULTI."""
    import redis as redis_lib

    from ldm_serve.errors import QueueUnavailable

    real_execute = redis_lib.client.Pipeline.execute
    calls = {"n": 0}

    def execute_then_lose_connection(self, *args, **kwargs):
        if self.explicit_transaction and calls["n"] == 0:  # the job's MULTI: Redis goes away at EXEC
            calls["n"] += 1
            self.reset()
            raise redis_lib.ConnectionError("connection lost at EXEC (simulated)")
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis_lib.client.Pipeline, "execute", execute_then_lose_connection)
    first = payload()
    with pytest.raises(QueueUnavailable):
        store.submit(first, "retry-me", "fp")
    assert calls["n"] == 1
    assert store.find_idempotent(None, "retry-me") is None  # nothing half-written
    retry = payload()
    job_id, created = store.submit(retry, "retry-me", "fp")  # the client's retry creates the job
    assert created and job_id == retry.job_id and store.get(job_id)["status"] == "queued"
    assert store.submit(payload(), "retry-me", "fp") == (job_id, False)


def test_concurrent_submissions_with_one_key_make_one_job(store: JobStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def attempt(_: int) -> tuple[str, bool]:
        own = JobStore(connect(store.settings), store.settings)  # one connection per client, as gateways have
        return own.submit(payload(), "same-key", "fp")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.queue_depth(["m"])[f"{PREFIX}-m-normal"] == 1
