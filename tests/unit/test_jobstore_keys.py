"""The pure parts of the job store (ldm_serve/jobstore.py); the Redis-backed ones are in
tests/integration/test_jobstore.py."""

from __future__ import annotations

import pytest
import redis

from ldm_serve.contract import new_job_id
from ldm_serve.embedded_redis import free_port
from ldm_serve.errors import InvalidInput, JobNotFound, QueueUnavailable
from ldm_serve.jobstore import (
    JobStore,
    check_idempotent_reuse,
    check_job_id,
    connect,
    terminal,
    translate_redis_errors,
)
from ldm_serve.settings import Settings


def test_check_job_id_refuses_anything_new_job_id_cannot_make() -> None:
    check_job_id(new_job_id())
    for bad in ("", "x", new_job_id() + ":events", new_job_id().upper(), "../../etc"):
        with pytest.raises(JobNotFound, match="not a job id"):
            check_job_id(bad)


def test_idempotency_key_reuse_with_another_body_is_a_422_naming_the_header() -> None:
    check_idempotent_reuse(("job1", "abc"), "abc")
    check_idempotent_reuse(("job1", ""), "abc")  # recorded by an older gateway without a fingerprint
    with pytest.raises(InvalidInput) as info:
        check_idempotent_reuse(("job1", "abc"), "xyz")
    assert info.value.field == "Idempotency-Key" and "job1" in str(info.value)


def test_terminal_statuses() -> None:
    assert [s for s in ("queued", "running", "succeeded", "failed", "canceled", "expired") if terminal(s)] == [
        "succeeded", "failed", "canceled", "expired"]


def test_redis_connection_errors_become_queue_unavailable() -> None:
    @translate_redis_errors
    def broken() -> None:
        raise redis.ConnectionError("refused")

    with pytest.raises(QueueUnavailable, match=r"Redis is unreachable \(broken\): refused"):
        broken()

    @translate_redis_errors
    def other() -> None:
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):  # a bug, not an outage: not hidden as a 503
        other()


def test_a_store_on_an_unreachable_redis_answers_queue_unavailable() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout_s=1.0)
    client = connect(settings)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    store = JobStore(client, settings)
    assert store.keys.job("j") == "ldm:job:j"
    for call in (store.ping, store.live_workers, lambda: store.get(new_job_id())):
        with pytest.raises(QueueUnavailable):
            call()
