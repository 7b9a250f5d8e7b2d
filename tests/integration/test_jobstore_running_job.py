"""The JobStore operations the worker uses for a running job (issue 11: only JobStore touches Redis for
job state), on a real Redis."""

from __future__ import annotations

import json
import time

import pytest

from ldm_serve.contract import EventType, GenerationPayload, JobKind, JobStatus, new_job_id
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.settings import Settings
from tests.serving_support import redis_for_tests, require_redis

pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> JobStore:
    url = redis_for_tests()
    require_redis(url)
    settings = Settings(redis_url=url, redis_prefix="jsrun")
    return JobStore(connect(settings), settings)


def running_job(store: JobStore) -> str:
    payload = GenerationPayload(job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="p", n=2, width=64,
                                height=64, steps=10, guidance_scale=5.0, seeds=[1, 2], created_at=time.time())
    job_id, _ = store.submit(payload)
    assert store.claim(job_id, "w1")
    return job_id


def events(store: JobStore, job_id: str) -> list[tuple[str, dict]]:
    raw = store.redis.xrange(store.keys.events(job_id))
    return [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in raw]


def test_record_steps_writes_progress_and_batch_and_reads_cancel_flags(store: JobStore) -> None:
    a, b = running_job(store), running_job(store)
    flags = store.record_steps({a: (2, 10), b: (3, 10)}, batch={b: json.dumps({"id": "s1", "rows": 4})})
    assert flags == {a: False, b: False}
    assert (store.get(a)["step"], store.get(a)["total"]) == ("2", "10")
    assert json.loads(store.get(b)["batch"]) == {"id": "s1", "rows": 4}
    assert events(store, a)[-1] == (EventType.PROGRESS.value, {"step": 2, "total": 10})
    assert not store.cancel_requested(a)
    assert store.cancel(a) is JobStatus.RUNNING  # running: the worker is asked via the flag
    assert store.cancel_requested(a)
    assert store.record_steps({a: (3, 10), b: (4, 10)}) == {a: True, b: False}
    assert store.record_steps({}) == {}


def test_record_image_and_set_batch(store: JobStore) -> None:
    job = running_job(store)
    store.set_batch([job], {"id": "b1", "jobs": 1, "rows": 2})
    assert json.loads(store.get(job)["batch"]) == {"id": "b1", "jobs": 1, "rows": 2}
    store.record_image(job, 1, final_step=10)  # decoded before its last step was reported
    store.record_image(job, 0)
    rec = store.get(job)
    assert rec["image:0"] == rec["image:1"] == "1" and (rec["step"], rec["total"]) == ("10", "10")
    assert events(store, job)[-3:] == [
        (EventType.PROGRESS.value, {"step": 10, "total": 10}),
        (EventType.IMAGE.value, {"index": 1}),
        (EventType.IMAGE.value, {"index": 0}),
    ]
