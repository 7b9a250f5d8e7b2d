"""The per-key limiter (ldm_serve.quotas) and the job store's owner index, on a real Redis.

Times are passed explicitly (``now=``) so that refills are tested without sleeping.
"""

from __future__ import annotations

import re
import time

import pytest

from ldm_serve.api_keys import KeyPolicy
from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, new_job_id
from ldm_serve.errors import JobNotFound
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.quotas import QuotaLimiter
from ldm_serve.settings import Settings
from tests.serving_support import redis_for_tests, require_redis

pytestmark = pytest.mark.integration

T0 = 1_800_000_000.0


@pytest.fixture
def store() -> JobStore:
    url = redis_for_tests()
    require_redis(url)
    return JobStore(connect(Settings(redis_url=url, redis_prefix="qt")), Settings(redis_url=url, redis_prefix="qt"))


@pytest.fixture
def limiter(store: JobStore) -> QuotaLimiter:
    return QuotaLimiter(store.redis, store.keys)


def policy(rpm: int = 0, work: int = 0, conc: int = 0) -> KeyPolicy:
    return KeyPolicy("t", requests_per_minute=rpm, concurrent_jobs=conc, pixel_steps_per_minute=work,
                     max_job_pixel_steps=0)


def submit(store: JobStore, limiter: QuotaLimiter, subject: str = "alice", owner: str | None = "alice",
           created_at: float | None = None) -> str:
    payload = GenerationPayload(
        job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="p", n=1, width=64, height=64, steps=2,
        guidance_scale=5.0, seeds=[1], owner=owner, created_at=created_at or time.time(),
    )
    return store.submit(payload, quota_key=limiter.active_key(subject))[0]


def test_requests_per_minute_refuses_then_refills(limiter: QuotaLimiter) -> None:
    p = policy(rpm=3)
    got = [limiter.admit("alice", p, f"j{i}", 1, 100, now=T0) for i in range(4)]
    assert [d.admitted for d in got] == [True, True, True, False]
    assert [d.remaining for d in got[:3]] == [2, 1, 0]
    refused = got[3]
    assert refused.which == "requests_per_minute" and refused.limit == 3 and refused.remaining == 0
    assert refused.retry_after_s == 20  # one token refills in 60 / 3 s
    assert refused.reset_s == 60
    assert not limiter.admit("alice", p, "j5", 1, 100, now=T0 + 19).admitted
    assert limiter.admit("alice", p, "j5", 1, 100, now=T0 + 20).admitted
    assert limiter.admit("bob", p, "j6", 1, 100, now=T0).admitted  # keys do not share buckets


def test_work_budget_charges_pixel_steps_and_refusals_charge_nothing(limiter: QuotaLimiter) -> None:
    p = policy(rpm=10, work=1000)
    assert limiter.admit("alice", p, "a", 700, 100, now=T0).admitted
    refused = limiter.admit("alice", p, "b", 400, 100, now=T0)
    assert not refused.admitted and refused.which == "pixel_steps_per_minute"
    assert refused.remaining == 300 and refused.retry_after_s == 6  # 100 more at 1000/60 per second
    # the refused request took no submission token: 9 of 10 are left
    ok = limiter.admit("alice", p, "c", 300, 100, now=T0)
    assert ok.admitted and ok.remaining == 8
    assert limiter.admit("alice", p, "d", 400, 100, now=T0 + 24).admitted


def test_concurrency_slot_is_freed_by_the_terminal_transition(store: JobStore, limiter: QuotaLimiter) -> None:
    p = policy(conc=2)
    jobs = []
    for _ in range(2):
        job_id = new_job_id()
        assert limiter.admit("alice", p, job_id, 1, 600).admitted
        jobs.append(job_id)
    for job_id in jobs:  # queue them as the gateway does, recording the slot's set on the job
        payload = GenerationPayload(
            job_id=job_id, kind=JobKind.TXT2IMG, model="m", prompt="p", n=1, width=64, height=64, steps=2,
            guidance_scale=5.0, seeds=[1], owner="alice", created_at=time.time(),
        )
        store.submit(payload, quota_key=limiter.active_key("alice"))
    refused = limiter.admit("alice", p, "third", 1, 600)
    assert not refused.admitted and refused.which == "concurrent_jobs" and refused.limit == 2
    assert limiter.admit("bob", p, "bobs", 1, 600).admitted  # another key is unaffected
    assert store.cancel(jobs[0]) is JobStatus.CANCELED
    assert limiter.active("alice") == [jobs[1]]
    assert limiter.admit("alice", p, "third", 1, 600).admitted


def test_a_vanished_or_expired_job_does_not_hold_a_slot_for_ever(store: JobStore, limiter: QuotaLimiter) -> None:
    p = policy(conc=1)
    job = submit(store, limiter)
    assert limiter.admit("alice", p, job, 1, 600).admitted
    assert not limiter.admit("alice", p, "next", 1, 600).admitted
    store.redis.delete(store.keys.job(job))  # the record expired without any transition
    assert limiter.admit("alice", p, "next", 1, 600).admitted  # recounted lazily when full
    # a slot whose deadline passed is dropped even if its job still looks alive
    # a job queued longer than the queue TTL has expired, even if nobody read it since
    old = submit(store, limiter, subject="dan", owner="dan", created_at=time.time() - 100)
    assert limiter.admit("dan", p, old, 1, 600, queue_ttl_s=1000).admitted
    assert not limiter.admit("dan", p, "next", 1, 600, queue_ttl_s=1000).admitted
    assert limiter.admit("dan", p, "next", 1, 600, queue_ttl_s=50).admitted
    alive = submit(store, limiter, subject="carol", owner="carol")
    assert limiter.admit("carol", p, alive, 1, 30, now=T0).admitted
    assert not limiter.admit("carol", p, "y", 1, 30, now=T0 + 29).admitted
    assert limiter.admit("carol", p, "y", 1, 30, now=T0 + 31).admitted


def test_release_gives_the_slot_back(limiter: QuotaLimiter) -> None:
    p = policy(conc=1)
    assert limiter.admit("alice", p, "a", 1, 600).admitted
    limiter.release("alice", "a")
    assert limiter.admit("alice", p, "b", 1, 600).admitted


def test_unlimited_policy_admits_everything(limiter: QuotaLimiter) -> None:
    p = policy()
    assert all(limiter.admit("alice", p, f"j{i}", 10**12, 600).admitted for i in range(50))
    assert limiter.active("alice") == []


def test_owner_index_lists_newest_first_in_pages_with_status_filter(store: JobStore, limiter: QuotaLimiter) -> None:
    now = time.time()
    ids = [submit(store, limiter, created_at=now + i) for i in range(7)]
    same_time = [submit(store, limiter, created_at=now + 10) for _ in range(3)]  # equal scores across pages
    submit(store, limiter, owner="bob", subject="bob")
    expected = sorted(same_time, reverse=True) + ids[::-1]
    seen: list[str] = []
    after = None
    for _ in range(20):
        recs, after = store.list_jobs("alice", limit=3, after=after)
        seen += [_job_id(r) for r in recs]
        if after is None:
            break
    assert seen == expected
    store.cancel(ids[2])
    recs, _ = store.list_jobs("alice", limit=50, statuses=frozenset({"canceled"}))
    assert [_job_id(r) for r in recs] == [ids[2]]


def test_delete_removes_every_key_and_index_entry(store: JobStore, limiter: QuotaLimiter) -> None:
    job = submit(store, limiter)
    store.redis.set(store.keys.image(job, 0), b"png")
    store.redis.set(store.keys.input(job, "mask"), b"png")
    assert store.delete(job)
    assert not store.redis.keys(f"qt:job:{job}*")
    assert store.list_jobs("alice", limit=10) == ([], None)
    assert store.redis.llen(store.queue("m", "normal").key) == 0
    with pytest.raises(JobNotFound):
        store.get(job)
    assert not store.delete(job)


def test_delete_requested_on_a_running_job_happens_at_its_terminal_transition(
    store: JobStore, limiter: QuotaLimiter
) -> None:
    job = submit(store, limiter)
    assert store.claim(job, "w1")
    store.request_delete(job)
    assert store.get(job)["status"] == "running"
    assert store.transition(job, [JobStatus.RUNNING], JobStatus.CANCELED)
    with pytest.raises(JobNotFound):
        store.get(job)
    assert limiter.active("alice") == []


def test_stale_index_entries_are_pruned_on_read(store: JobStore, limiter: QuotaLimiter) -> None:
    live = submit(store, limiter)
    gone = submit(store, limiter)
    store.redis.delete(store.keys.job(gone))
    recs, _ = store.list_jobs("alice", limit=10)
    assert [_job_id(r) for r in recs] == [live]
    assert store.redis.zscore(store.keys.owner_jobs("alice"), gone) is None


def _job_id(rec: dict[str, str]) -> str:
    return GenerationPayload.model_validate_json(rec["payload"]).job_id


def test_webhook_payloads_carry_signed_image_urls_when_enabled(store: JobStore) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer

    from ldm_serve.contract import WebhookEventType, WebhookSpec
    from worker.webhook_events import WebhookEmitter

    settings = store.settings.model_copy(
        update={"public_base_url": "https://img.example.com", "url_signing_secret": "k" * 20}
    )
    payload = GenerationPayload(
        job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="p", n=1, width=64, height=64, steps=2,
        guidance_scale=5.0, seeds=[1], created_at=time.time(),
        webhook=WebhookSpec(url="https://hooks.example.com/x", events=[WebhookEventType.COMPLETED]),
    )
    store.submit(payload)
    store.redis.hset(store.keys.job(payload.job_id), mapping={"status": "succeeded", "image:0": 1})
    assert WebhookEmitter(store, settings).emit(payload, WebhookEventType.COMPLETED)
    queue = Queue(f"{settings.redis_prefix}-webhooks", connection=store.redis, serializer=JSONSerializer)
    event = queue.jobs[0].kwargs["event"]
    url = event["data"]["images"][0]["url"]
    assert url.startswith(f"https://img.example.com/v1/jobs/{payload.job_id}/images/0?expires=")
    assert "&signature=" in url
    # the one envelope builder (ldm_serve.webhooks.events.WebhookEvent): UTC, milliseconds, "Z"
    assert event["type"] == "job.succeeded" and set(event) == {"type", "timestamp", "data"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"]), event["timestamp"]


def test_request_delete_never_recreates_a_deleted_record(store: JobStore, limiter: QuotaLimiter) -> None:
    job = submit(store, limiter)
    assert store.delete(job)
    with pytest.raises(JobNotFound):
        store.request_delete(job)
    assert not store.redis.exists(store.keys.job(job))
