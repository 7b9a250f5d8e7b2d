"""Webhook delivery through real Redis + RQ to a real local HTTP server: signatures, retry, records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from ldm_serve import webhooks as wh
from ldm_serve.contract import Keys
from ldm_serve.embedded_redis import EmbeddedValkey
from tests.serving_support import ROOT, start_hook_server

pytestmark = pytest.mark.integration

TEST_DB = 14  # dedicated database, flushed before and after each test
QUEUE = "test-ldm-webhooks"


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """REDIS_URL (or 127.0.0.1:6379) on database 14; an embedded Valkey when neither answers."""
    url = _with_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), TEST_DB)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
        yield url
    except redis.ConnectionError:
        with EmbeddedValkey() as server:
            yield _with_db(server.url, TEST_DB)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def secret(monkeypatch) -> str:
    value = wh.generate_secret()
    config = wh.DeliveryConfig(
        secret=value, allow_private=True, timeout_s=3.0, max_attempts=3, base_delay_s=0.2, jitter=0.0
    )
    monkeypatch.setattr(wh.delivery, "_config", config)
    return value


class Receiver:
    """A local HTTP server answering POSTs with the given status codes in turn (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes, float]] = []

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        self.requests.append((headers, body, time.time()))
        return self.statuses[min(len(self.requests), len(self.statuses)) - 1]

    def __enter__(self) -> Receiver:
        self.server, self.url = start_hook_server(self._answer, "/hooks/ldm")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _records(conn: redis.Redis, job_id: str) -> list[dict]:
    return [json.loads(raw) for raw in conn.lrange(Keys().webhook_attempts(job_id), 0, -1)]


def _run_until(done, tick, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "webhook delivery did not finish in time"
        tick()
        time.sleep(0.1)


def _metric(result: str) -> float:
    return REGISTRY.get_sample_value("ldm_webhook_deliveries_total", {"result": result}) or 0.0


def test_retry_after_500_with_valid_signatures(conn, secret):
    delivered_before, retrying_before = _metric("delivered"), _metric("retrying")
    event = wh.WebhookEvent("job.succeeded", {"id": "job-1", "status": "succeeded"})
    with Receiver([500, 200]) as receiver:
        msg_id = wh.enqueue_webhook(conn, job_id="job-1", url=receiver.url, event=event, queue_name=QUEUE)
        worker = wh.WebhookWorker(conn, QUEUE, poll_s=0.1)
        _run_until(lambda: any(r["result"] != "retrying" for r in _records(conn, "job-1")), worker.run_once)

    # the receiver saw two attempts of the same message, each validly signed with its own timestamp
    assert len(receiver.requests) == 2
    standardwebhooks = pytest.importorskip("standardwebhooks.webhooks")
    for headers, body, _ in receiver.requests:
        assert headers["webhook-id"] == msg_id
        assert headers["content-type"] == "application/json"
        wh.verify(secret, headers, body)
        payload = standardwebhooks.Webhook(secret).verify(body, headers)  # the reference implementation
        assert payload["type"] == "job.succeeded" and payload["data"] == {
            "id": "job-1",
            "status": "succeeded",
        }
    first, second = receiver.requests
    assert second[2] - first[2] >= 0.2  # the retry waited for its backoff (base_delay_s)

    records = _records(conn, "job-1")
    assert [(r["attempt"], r["status_code"], r["result"]) for r in records] == [
        (1, 500, "retrying"),
        (2, 200, "delivered"),
    ]
    assert records[0]["error"] == "HTTP 500" and "next_attempt_at" in records[0]
    assert all(r["webhook_id"] == msg_id and r["event_type"] == "job.succeeded" for r in records)
    assert 0 < conn.ttl(Keys().webhook_attempts("job-1")) <= wh.get_delivery_config().record_ttl_s
    assert _metric("delivered") == delivered_before + 1 and _metric("retrying") == retrying_before + 1


def test_gives_up_after_max_attempts_and_progress_is_not_retried(conn, secret):
    with Receiver([503]) as receiver:
        wh.enqueue_webhook(
            conn,
            job_id="job-2",
            url=receiver.url,
            event=wh.WebhookEvent("job.failed", {"id": "job-2"}),
            queue_name=QUEUE,
        )
        wh.enqueue_webhook(
            conn,
            job_id="job-3",
            url=receiver.url,
            event=wh.WebhookEvent("job.progress", {"id": "job-3"}),
            queue_name=QUEUE,
        )
        worker = wh.WebhookWorker(conn, QUEUE, poll_s=0.1)
        _run_until(lambda: any(r["result"] == "gave_up" for r in _records(conn, "job-2")), worker.run_once)

    assert [(r["attempt"], r["result"]) for r in _records(conn, "job-2")] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "gave_up"),
    ]
    assert [(r["attempt"], r["status_code"], r["result"]) for r in _records(conn, "job-3")] == [
        (1, 503, "gave_up")
    ]
    assert len(receiver.requests) == 4


def test_connection_error_is_retried(conn, secret):
    with Receiver([200]) as receiver:
        dead_url = receiver.url
    wh.enqueue_webhook(
        conn, job_id="job-4", url=dead_url, event=wh.WebhookEvent("job.started", {}), queue_name=QUEUE
    )
    wh.WebhookWorker(conn, QUEUE).run_once()
    (record,) = _records(conn, "job-4")
    assert (
        record["result"] == "retrying" and record["status_code"] is None and "ConnectError" in record["error"]
    )


def test_plain_rq_worker_with_scheduler_runs_the_retries(conn, redis_url, secret, tmp_path):
    """The documented deployment: ``rq worker -w worker.webhook_delivery.ConfiguredWebhookWorker
    --with-scheduler`` as a process of its own, configured from ``LDM_*`` variables."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT), LDM_WEBHOOK_SECRET=secret, LDM_ALLOW_PRIVATE_WEBHOOKS="true",
        LDM_WEBHOOK_RETRY_BASE_S="0.2", LDM_WEBHOOK_MAX_ATTEMPTS="3",
    )
    log = tmp_path / "rq-worker.log"
    with Receiver([500, 200]) as receiver:
        wh.enqueue_webhook(
            conn,
            job_id="job-5",
            url=receiver.url,
            event=wh.WebhookEvent("job.canceled", {}),
            queue_name=QUEUE,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", "-w", "worker.webhook_delivery.ConfiguredWebhookWorker",
             "--with-scheduler", "--serializer", "rq.serializers.JSONSerializer", "--url", redis_url, QUEUE],
            env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            def delivered() -> bool:
                assert proc.poll() is None, log.read_text()
                return any(r["result"] == "delivered" for r in _records(conn, "job-5"))

            _run_until(delivered, lambda: None, timeout_s=60)
        finally:
            # the worker and its forked scheduler; a clean stop may wait out RQ's pubsub poll
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert [r["result"] for r in _records(conn, "job-5")] == ["retrying", "delivered"]
    assert len(receiver.requests) == 2


def test_worker_thread_stops_on_event(conn, secret):
    with Receiver([200]) as receiver:
        stop = threading.Event()
        thread = threading.Thread(target=wh.WebhookWorker(conn, QUEUE, poll_s=0.05).run, args=(stop,))
        thread.start()
        try:
            wh.enqueue_webhook(
                conn,
                job_id="job-6",
                url=receiver.url,
                event=wh.WebhookEvent("job.started", {}),
                queue_name=QUEUE,
            )
            _run_until(lambda: bool(_records(conn, "job-6")), lambda: None)
        finally:
            stop.set()
            thread.join(timeout=5)
    assert not thread.is_alive()
    assert [r["result"] for r in _records(conn, "job-6")] == ["delivered"]
    assert json.loads(receiver.requests[0][1])["type"] == "job.started"


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """A pure-Python busy thread in this process, like the generation loop beside the delivery thread."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=5)


def _delivered(conn: redis.Redis, job_ids: list[str], n_each: int) -> bool:
    return all(
        sum(r["result"] == "delivered" for r in _records(conn, job_id)) == n_each for job_id in job_ids
    )


def _wait(done, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.05)


def test_burst_of_events_is_delivered_promptly_under_cpu_load(conn, secret, cpu_hog):
    """Issue 10: 6 quick jobs x (started, progress, succeeded) used to arrive a minute late.

    A delivery thread that RQ's worker made wait for its pubsub helper (60 s poll) stalled
    every later event; 30 s is far beyond what 18 local deliveries need and far below 60 s.
    """
    jobs = [f"burst-{i}" for i in range(6)]
    types = ["job.started", "job.progress", "job.succeeded"]
    with Receiver([200]) as receiver:
        stop = threading.Event()
        thread = threading.Thread(target=wh.WebhookWorker(conn, QUEUE, poll_s=0.25).run, args=(stop,))
        thread.start()
        try:
            for job_id in jobs:  # each job's events in order, the jobs interleaved as in a batch
                for event_type in types:
                    wh.enqueue_webhook(
                        conn, job_id=job_id, url=receiver.url, event=wh.WebhookEvent(event_type, {"id": job_id}),
                        queue_name=QUEUE,
                    )
                    time.sleep(0.02)
            _wait(lambda: _delivered(conn, jobs, len(types)), 30, "18 deliveries")  # a stall would add 60 s
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive()
    bodies = [json.loads(body) for _, body, _ in receiver.requests]
    assert len(bodies) == 18
    for job_id in jobs:
        assert [b["type"] for b in bodies if b["data"]["id"] == job_id] == types
    assert len({headers["webhook-id"] for headers, _, _ in receiver.requests}) == 18


def test_a_descheduled_delivery_thread_does_not_wait_for_rq_pubsub(conn, secret, monkeypatch):
    """The race behind the 60 s stall, made deterministic.

    RQ's worker sends UNSUBSCRIBE on teardown and then joins its pubsub helper thread; when the
    worker thread loses the CPU in between (a loaded machine), the helper reads the reply, finds no
    subscription left and waits out its 60 s poll before the join returns. Here the thread sleeps
    right after sending UNSUBSCRIBE; the delivery worker must not depend on that helper at all.
    """
    unsubscribe = redis.client.PubSub.unsubscribe

    def descheduled_after_unsubscribe(self, *args):
        result = unsubscribe(self, *args)
        time.sleep(0.2)
        return result

    monkeypatch.setattr(redis.client.PubSub, "unsubscribe", descheduled_after_unsubscribe)
    with Receiver([200]) as receiver:
        worker = wh.WebhookWorker(conn, QUEUE, poll_s=0.1)
        for i in range(2):
            wh.enqueue_webhook(
                conn, job_id=f"desched-{i}", url=receiver.url, event=wh.WebhookEvent("job.started", {}),
                queue_name=QUEUE,
            )
            result: list[bool] = []
            ticker = threading.Thread(target=lambda out=result: out.append(worker.run_once()), daemon=True)
            ticker.start()
            ticker.join(timeout=20)
            assert result == [True], "a delivery tick did not finish within 20 s"
        assert len(receiver.requests) == 2
    assert _delivered(conn, ["desched-0", "desched-1"], 1)
