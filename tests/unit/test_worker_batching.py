"""The pure batch-selection rule."""

from __future__ import annotations

from worker.batching import Candidate, select_compatible


def c(job: str, key: str = "m|64x64", rows: int = 1) -> Candidate:
    return Candidate(job, key, rows)


def test_only_same_model_and_size_join() -> None:
    chosen = select_compatible("m|64x64", 8, [c("a"), c("b", "m|128x128"), c("d", "other|64x64"), c("e")])
    assert [x.job_id for x in chosen] == ["a", "e"]


def test_rows_are_capped_and_jobs_never_split() -> None:
    chosen = select_compatible("m|64x64", 4, [c("a", rows=2), c("b", rows=3), c("c", rows=2), c("d")])
    assert [x.job_id for x in chosen] == ["a", "c"]  # b does not fit in the 2 rows left; d has no room


def test_no_room_means_no_jobs() -> None:
    assert select_compatible("m|64x64", 0, [c("a")]) == []


class _FakeRedis:
    """Just enough of a Redis client for BatchCollector.gather."""

    def __init__(self, arrivals: dict[float, list[str]], clock: list[float]) -> None:
        self.queue: list[str] = []
        self.arrivals = arrivals
        self.clock = clock

    def _arrive(self) -> None:
        for t in [t for t in self.arrivals if t <= self.clock[0]]:
            self.queue += self.arrivals.pop(t)

    def pipeline(self, transaction: bool = False) -> _FakeRedis:
        self._ops: list = []
        return self

    def lrange(self, key: str, start: int, end: int) -> None:
        self._arrive()
        self._ops.append([j.encode() for j in self.queue])

    def hmget(self, key: str, fields: list[str]) -> None:
        self._ops.append([b"m|64x64", b"1"])

    def execute(self) -> list:
        return self._ops

    def register_script(self, script: str):
        """Emulates the collector's take script: LREM from a queue + SADD to the running set."""

        def run(keys: list[str], args: list[str]) -> int:
            return self.lrem(keys[0], 1, args[0])

        return run

    def lrem(self, key: str, count: int, job_id: str) -> int:
        if job_id in self.queue:
            self.queue.remove(job_id)
            return 1
        return 0


def _collector(arrivals: dict[float, list[str]]):
    from ldm_serve.contract import Keys, Priority
    from worker.batching import BatchCollector

    now = [0.0]

    def sleep(dt: float) -> None:
        now[0] += dt

    fake = _FakeRedis(arrivals, now)
    keys = {p: f"q-{p.value}" for p in Priority}
    return BatchCollector(fake, Keys("t"), keys, "w", clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]


def test_window_collects_late_arrivals_when_lingering() -> None:
    c = _collector({0.0: ["a"], 0.02: ["b", "c"], 0.5: ["late"]})
    assert c.gather("m|64x64", 8, window_s=0.1) == ["a", "b", "c"]


def test_lone_job_does_not_wait_without_linger() -> None:
    c = _collector({0.02: ["b"]})
    assert c.gather("m|64x64", 8, window_s=0.1, linger=False) == []
    c = _collector({0.0: ["a"], 0.02: ["b"]})  # company found at once: the window is used
    assert c.gather("m|64x64", 8, window_s=0.1, linger=False) == ["a", "b"]


def test_an_unreachable_redis_is_queue_unavailable_not_a_crash() -> None:
    """The worker loop waits out QueueUnavailable (Redis restarting); a raw ConnectionError from
    the collector used to end the worker process (issue 10, found by the `up` supervision work)."""
    import pytest
    import redis

    from ldm_serve.contract import Keys, Priority
    from ldm_serve.errors import QueueUnavailable
    from tests.serving_support import free_port
    from worker.batching import BatchCollector

    dead = redis.Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    keys = Keys("t")
    collector = BatchCollector(dead, keys, {p: f"q-{p.value}" for p in Priority}, "w1")
    with pytest.raises(QueueUnavailable):
        collector.pop_next(timeout_s=0)
    with pytest.raises(QueueUnavailable):
        collector.gather("m|64x64", 4, 0.0)
