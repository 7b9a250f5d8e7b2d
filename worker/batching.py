"""Gathering compatible queued jobs into one batch.

The worker pops the next job (highest priority first), then, for up to
``batch_window_ms``, pulls every queued job with the same batch key (model and
pixel size) until the batch holds ``max_batch_rows`` rows. Prompts, seeds, step
counts and guidance may differ: the pipeline runs them as per-row parameters.

The selection rule is the pure function :func:`select_compatible`; the Redis part
takes candidates with ``LREM`` so two workers can never take the same job.

Every pop and take is one Lua script that also adds the job to the worker's
running set (``Keys.worker_jobs``) in the same atomic step. A worker that dies
between taking a job and claiming it therefore still leaves the job where
dead-worker recovery looks (``JobStore.recover_jobs_of``), never in limbo.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from ldm_serve.contract import PRIORITY_ORDER, Keys, Priority
from ldm_serve.jobstore import translate_redis_errors

# KEYS = queue lists (highest priority first) + the worker's running set (last)
_POP_TO_WORKER = """
for i = 1, #KEYS - 1 do
  local id = redis.call('LPOP', KEYS[i])
  if id then
    redis.call('SADD', KEYS[#KEYS], id)
    return id
  end
end
return false
"""
# same KEYS; ARGV[1] = the job id to take out of whichever queue holds it
_TAKE_TO_WORKER = """
for i = 1, #KEYS - 1 do
  if redis.call('LREM', KEYS[i], 1, ARGV[1]) > 0 then
    redis.call('SADD', KEYS[#KEYS], ARGV[1])
    return 1
  end
end
return 0
"""


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


def select_in_order(key: str, rows_left: int, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The head of the queue while it is compatible and fits: strict queue order.

    Used to feed a running continuous batch: stopping at the first job of another
    size (or one too big for the room left) means that job is never overtaken; the
    running batch drains and that job starts next, so no size or big job starves.
    """
    chosen: list[Candidate] = []
    for c in candidates:
        if c.batch_key != key or c.rows > rows_left:
            break
        chosen.append(c)
        rows_left -= c.rows
    return chosen


class BatchCollector:
    """Pops jobs for one worker from the per-priority RQ queues.

    Args:
        connection: Redis client.
        keys: key names.
        queue_keys: RQ list keys by priority.
        worker: the worker's name; taken jobs join its running set atomically.
        scan_limit: how many queued ids per queue are inspected per pass.
        poll_s: idle polling interval of :meth:`pop_next` (Lua cannot block).
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        queue_keys: dict[Priority, str],
        worker: str,
        scan_limit: int = 64,
        poll_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = connection
        self.keys = keys
        self.queue_keys = [queue_keys[p] for p in PRIORITY_ORDER]
        self.worker_set = keys.worker_jobs(worker)
        self.scan_limit = scan_limit
        self.poll_s = poll_s
        self._pop = connection.register_script(_POP_TO_WORKER)
        self._take_script = connection.register_script(_TAKE_TO_WORKER)
        self.clock = clock
        self.sleep = sleep

    @translate_redis_errors  # a Redis restart is a QueueUnavailable the worker loop waits out, not a crash
    def pop_next(self, timeout_s: int) -> str | None:
        """Wait up to ``timeout_s`` for the next job id, highest priority first.

        The id is in the worker's running set when this returns.
        """
        deadline = self.clock() + timeout_s
        while True:
            got = self._pop(keys=[*self.queue_keys, self.worker_set])
            if got is not None:
                return got.decode() if isinstance(got, bytes) else str(got)
            if self.clock() >= deadline:
                return None
            self.sleep(self.poll_s)

    @translate_redis_errors
    def gather(
        self, key: str, rows_left: int, window_s: float, linger: bool = True, in_order: bool = False
    ) -> list[str]:
        """Take compatible queued jobs for up to ``window_s`` seconds or until the rows are full.

        With ``linger=False`` the window is only used when the first scan finds company:
        a lone request under light load then starts at once instead of paying the window.
        With ``in_order=True`` only the compatible head of the queue is taken
        (:func:`select_in_order`), never jobs behind one of another size.
        """
        taken: list[str] = []
        deadline = self.clock() + window_s
        while rows_left > 0:
            for c in self._compatible_candidates(key, rows_left, in_order):
                if self._take(c.job_id):
                    taken.append(c.job_id)
                    rows_left -= c.rows
            if rows_left <= 0 or self.clock() >= deadline or not (taken or linger):
                break
            self.sleep(min(0.01, max(0.0, deadline - self.clock())))
        return taken

    def _compatible_candidates(self, key: str, rows_left: int, in_order: bool = False) -> list[Candidate]:
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
        return (select_in_order if in_order else select_compatible)(key, rows_left, candidates)

    def _take(self, job_id: str) -> bool:
        return bool(self._take_script(keys=[*self.queue_keys, self.worker_set], args=[job_id]))
