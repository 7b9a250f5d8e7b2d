"""Gathering compatible queued jobs into one batch.

The worker pops the next job (highest priority first), then, for up to
``batch_window_ms``, pulls every queued job with the same batch key (model and
pixel size) until the batch holds ``max_batch_rows`` rows. Prompts, seeds, step
counts and guidance may differ: the pipeline runs them as per-row parameters.

The selection rule is the pure function :func:`select_compatible`; the Redis part
claims candidates with ``LREM`` so two workers can never take the same job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from ldm_serve.contract import PRIORITY_ORDER, Keys, Priority


@dataclass(frozen=True)
class Candidate:
    """A queued job as seen by the batcher."""

    job_id: str
    batch_key: str
    rows: int


def select_compatible(key: str, rows_left: int, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates (in queue order) with batch key ``key`` that fit into ``rows_left`` rows.

    A job never spans batches: one that does not fit is skipped, and a smaller
    later one may still join (first-fit in queue order).
    """
    chosen: list[Candidate] = []
    for c in candidates:
        if c.batch_key == key and c.rows <= rows_left:
            chosen.append(c)
            rows_left -= c.rows
    return chosen


class BatchCollector:
    """Pops jobs for one worker from the per-priority RQ queues.

    Args:
        connection: Redis client.
        keys: key names.
        queue_keys: RQ list keys by priority.
        scan_limit: how many queued ids per queue are inspected per pass.
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        queue_keys: dict[Priority, str],
        scan_limit: int = 64,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = connection
        self.keys = keys
        self.queue_keys = [queue_keys[p] for p in PRIORITY_ORDER]
        self.scan_limit = scan_limit
        self.clock = clock
        self.sleep = sleep

    def pop_next(self, timeout_s: int) -> str | None:
        """Block up to ``timeout_s`` for the next job id, highest priority first."""
        got = self.redis.blpop(self.queue_keys, timeout=timeout_s)
        if got is None:
            return None
        return got[1].decode()

    def gather(self, key: str, rows_left: int, window_s: float, linger: bool = True) -> list[str]:
        """Take compatible queued jobs for up to ``window_s`` seconds or until the rows are full.

        With ``linger=False`` the window is only used when the first scan finds company:
        a lone request under light load then starts at once instead of paying the window.
        """
        taken: list[str] = []
        deadline = self.clock() + window_s
        while rows_left > 0:
            for c in self._compatible_candidates(key, rows_left):
                if self._take(c.job_id):
                    taken.append(c.job_id)
                    rows_left -= c.rows
            if rows_left <= 0 or self.clock() >= deadline or not (taken or linger):
                break
            self.sleep(min(0.01, max(0.0, deadline - self.clock())))
        return taken

    def _compatible_candidates(self, key: str, rows_left: int) -> list[Candidate]:
        pipe = self.redis.pipeline(transaction=False)
        for qk in self.queue_keys:
            pipe.lrange(qk, 0, self.scan_limit - 1)
        ids = [i.decode() for chunk in pipe.execute() for i in chunk]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), ["bkey", "rows"])
        meta = pipe.execute()
        candidates = [
            Candidate(job_id, (bkey or b"").decode(), int(rows or 0))
            for job_id, (bkey, rows) in zip(ids, meta, strict=True)
            if bkey is not None and rows is not None
        ]
        return select_compatible(key, rows_left, candidates)

    def _take(self, job_id: str) -> bool:
        for qk in self.queue_keys:
            if self.redis.lrem(qk, 1, job_id):
                return True
        return False
