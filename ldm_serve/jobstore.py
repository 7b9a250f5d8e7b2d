"""Job records, queues and worker registry in Redis, shared by the gateway and the worker.

RQ carries the payload (a JSON-serialised :class:`~ldm_serve.contract.GenerationPayload`
in an RQ job whose id is our job id) and provides the per-priority queues. The public
state of a job (status, progress, timestamps, errors) lives in our own hash, changed
only by :meth:`JobStore.transition`, a Lua script that checks the current status so
that concurrent cancel / claim / finish / recovery cannot overwrite each other.

Every Redis connection error is translated into :class:`~ldm_serve.errors.QueueUnavailable`
here, so callers deal only with ``ldm_serve.errors``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from ldm_serve.contract import (
    GENERATE_FUNC,
    PRIORITY_ORDER,
    TERMINAL_STATUSES,
    EventType,
    GenerationPayload,
    JobStatus,
    Keys,
    Priority,
    WorkerInfo,
    is_job_id,
    queue_name,
    webhook_queue_name,
)
from ldm_serve.errors import InvalidInput, JobNotFound, QueueFull, QueueUnavailable
from ldm_serve.settings import Settings

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 2000

T = TypeVar("T")

# KEYS: job hash, events stream. ARGV: allowed-from (comma list), new status,
# event JSON, stream maxlen, terminal ("1"/"0"), job id, then field/value pairs to set
# with the status. A terminal status also frees the job's per-key concurrency slot
# (the sorted set named by the job's ``quota_key`` field, see ldm_serve.quotas).
# Returns 0 (refused), 1 (done) or 2 (done, terminal, and the job is to be deleted).
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then ok = true end
end
if not ok then return 0 end
if #ARGV > 6 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 7))
else
  redis.call('HSET', KEYS[1], 'status', ARGV[2])
end
if ARGV[5] == '1' then
  local q = redis.call('HGET', KEYS[1], 'quota_key')
  if q and q ~= '' then redis.call('ZREM', q, ARGV[6]) end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'status', 'data', ARGV[3])
if ARGV[5] == '1' and redis.call('HEXISTS', KEYS[1], 'delete_requested') == 1 then return 2 end
return 1
"""


# KEYS: job hash. ARGV: field. Sets field=1 only on an existing record.
_FLAG_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 1)
return 1
"""


def translate_redis_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn Redis connectivity errors into QueueUnavailable (503)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise QueueUnavailable(f"Redis is unreachable ({fn.__name__}): {exc}") from exc

    return wrapper


def connect(settings: Settings) -> redis.Redis:
    """A binary-safe Redis client with short timeouts (RQ needs ``decode_responses=False``)."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=min(2.0, settings.redis_socket_timeout_s),
        socket_timeout=settings.redis_socket_timeout_s,
        health_check_interval=10,
        retry_on_timeout=False,
    )


def _s(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    """Typed access to job records, queues and the worker registry.

    Args:
        connection: a client from :func:`connect`.
        settings: the process settings (prefix, TTLs, queue depth).
    """

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.redis = connection
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._transition = connection.register_script(_TRANSITION_LUA)
        self._flag_if_exists = connection.register_script(_FLAG_IF_EXISTS_LUA)
        self._queues: dict[tuple[str, Priority], Queue] = {}

    def queue(self, model: str, priority: Priority | str) -> Queue:
        """The RQ queue of a model and priority (JSON serializer)."""
        key = (model, Priority(priority))
        if key not in self._queues:
            self._queues[key] = Queue(
                queue_name(self.settings.redis_prefix, model, key[1]),
                connection=self.redis,
                serializer=JSONSerializer,
            )
        return self._queues[key]

    def queue_keys(self, model: str) -> dict[Priority, str]:
        """RQ list keys of a model's queues, by priority."""
        return {p: self.queue(model, p).key for p in PRIORITY_ORDER}

    # ------------------------------------------------------------------ submission
    @translate_redis_errors
    def ping(self) -> None:
        self.redis.ping()

    @translate_redis_errors
    def known_models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(self.keys.models))

    @translate_redis_errors
    def queue_depth(self, extra_models: Iterable[str] = ()) -> dict[str, int]:
        """Queued jobs per queue name, over every known model."""
        queues = [
            self.queue(m, p) for m in sorted(set(self.known_models()) | set(extra_models)) for p in PRIORITY_ORDER
        ]
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q.key)
        return {q.name: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}

    @translate_redis_errors
    def webhook_backlog(self) -> dict[str, int]:
        """Webhook deliveries not yet done: ``queued`` (due now) and ``scheduled`` (retries waiting for their time)."""
        from rq.registry import ScheduledJobRegistry

        q = Queue(webhook_queue_name(self.settings.redis_prefix), connection=self.redis, serializer=JSONSerializer)
        return {"queued": int(q.count), "scheduled": int(ScheduledJobRegistry(queue=q).count)}

    @translate_redis_errors
    def find_idempotent(self, owner: str | None, key: str) -> tuple[str, str] | None:
        """``(job_id, request_fingerprint)`` recorded under an Idempotency-Key, if any."""
        return _split_idempotent(_s(self.redis.get(self.keys.idempotency(owner, key))))

    @translate_redis_errors
    def submit(
        self,
        payload: GenerationPayload,
        idempotency_key: str | None = None,
        fingerprint: str = "",
        quota_key: str = "",
    ) -> tuple[str, bool]:
        """Record and enqueue a job.

        Args:
            payload: the job.
            idempotency_key: the client's Idempotency-Key, if any.
            fingerprint: a digest of the request body, recorded with the key so that a
                reuse of the key with another body can be refused.
            quota_key: the concurrency set holding the job's slot (ldm_serve.quotas), freed
                when the job reaches a terminal status.

        Returns:
            ``(job_id, created)``; ``created`` is False when ``idempotency_key`` was
            already used by the same owner, in which case that job's id is returned.

        Raises:
            QueueFull: the queues hold ``max_queue_depth`` jobs already.
            InvalidInput: the key was already used with a different request body.
        """
        idem_key = self.keys.idempotency(payload.owner, idempotency_key) if idempotency_key else None
        while True:
            try:
                return self._submit_once(payload, idem_key, fingerprint, quota_key)
            except redis.WatchError:
                continue  # a request with the same key committed first: the next turn returns its job

    def _submit_once(
        self, payload: GenerationPayload, idem_key: str | None, fingerprint: str, quota_key: str
    ) -> tuple[str, bool]:
        """One optimistic attempt of :meth:`submit`.

        The Idempotency-Key is WATCHed, read, and written in the same ``MULTI`` that creates
        the job, so the key exists exactly when its job does: a connection lost half-way
        leaves neither (a retry then creates the job), and of two concurrent requests with
        one key, the second gets ``WatchError`` and, on its next turn, the first's job.
        """
        s = self.settings
        job_id = payload.job_id
        lifetime = s.queue_ttl_s + s.job_timeout_s + s.result_ttl_s
        pipe = self.redis.pipeline(transaction=True)
        try:
            if idem_key is not None:
                pipe.watch(idem_key)  # immediate mode until RQ's enqueue below starts the MULTI
                existing = _split_idempotent(_s(pipe.get(idem_key)))
                if existing is not None:
                    check_idempotent_reuse(existing, fingerprint)
                    return existing[0], False
            depth = sum(self.queue_depth([payload.model]).values())
            if depth >= s.max_queue_depth:
                raise QueueFull(
                    f"queue: {depth} jobs are queued, the limit is max_queue_depth={s.max_queue_depth}",
                    retry_after_s=s.queue_full_retry_after_s,
                )
            # RQ starts the MULTI itself, so it must see the pipeline first; all of it is one transaction.
            self.queue(payload.model, payload.priority).enqueue_call(
                func=GENERATE_FUNC,
                kwargs={"payload": payload.model_dump(mode="json")},
                job_id=job_id,
                timeout=s.job_timeout_s,
                result_ttl=s.result_ttl_s,
                failure_ttl=s.result_ttl_s,
                description=f"{payload.kind.value} {payload.model} {payload.width}x{payload.height} n={payload.n}",
                pipeline=pipe,
            )
            if idem_key is not None:
                pipe.set(idem_key, f"{job_id} {fingerprint}", ex=lifetime)
            self._record_new_job(pipe, payload, quota_key, lifetime)
            pipe.execute()
            return job_id, True
        finally:
            pipe.reset()

    def _record_new_job(self, pipe: Any, payload: GenerationPayload, quota_key: str, lifetime: int) -> None:
        """Queue the job's hash, owner-index entry and first event on ``pipe`` (inside the MULTI)."""
        job_id = payload.job_id
        now = payload.created_at
        pipe.hset(
            self.keys.job(job_id),
            mapping={
                "status": JobStatus.QUEUED.value,
                "payload": payload.model_dump_json(),
                "bkey": payload.batch_key,
                "model": payload.model,
                "rows": payload.n,
                "priority": payload.priority.value,
                "owner": payload.owner or "",
                "created_at": repr(now),
                "attempts": 0,
                "step": 0,
                "total": 0,
                "images": 0,
                "quota_key": quota_key,
            },
        )
        pipe.expire(self.keys.job(job_id), lifetime)
        owner_index = self.keys.owner_jobs(payload.owner)
        pipe.zadd(owner_index, {job_id: now})
        pipe.expire(owner_index, lifetime)
        pipe.xadd(
            self.keys.events(job_id),
            {"type": EventType.STATUS.value, "data": json.dumps({"status": "queued"})},
            maxlen=EVENTS_MAXLEN,
        )
        pipe.expire(self.keys.events(job_id), lifetime)

    # ------------------------------------------------------------------ reading
    @translate_redis_errors
    def get(self, job_id: str) -> dict[str, str]:
        """The job hash as ``str -> str``; raises JobNotFound (also for an id of the wrong format)."""
        check_job_id(job_id)
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw or b"payload" not in raw:  # a late worker write after a delete leaves only stray fields
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")
        return {k.decode(): v.decode() for k, v in raw.items()}

    @translate_redis_errors
    def payload(self, job_id: str) -> GenerationPayload:
        return GenerationPayload.model_validate_json(self.get(job_id)["payload"])

    @translate_redis_errors
    def queue_position(self, job_id: str, model: str, priority: str) -> int | None:
        """0-based position counting every job of the model that will be taken before this one."""
        check_job_id(job_id)
        ahead = 0
        for p in PRIORITY_ORDER:
            key = self.queue(model, p).key
            if p.value == priority:
                pos = self.redis.lpos(key, job_id)
                return None if pos is None else ahead + int(pos)
            ahead += int(self.redis.llen(key))
        return None

    @translate_redis_errors
    def webhook_attempts(self, job_id: str) -> list[dict[str, Any]]:
        check_job_id(job_id)
        return [json.loads(x) for x in self.redis.lrange(self.keys.webhook_attempts(job_id), 0, 99)]

    @translate_redis_errors
    def enqueue_webhook(self, job_id: str, url: str, event: Any, queue_name: str) -> str:
        """Queue the first delivery attempt of a job's webhook ``event``; its attempts are kept
        under the job's ``webhooks`` key (expiring with the job's results). Returns the ``webhook-id``."""
        from ldm_serve.webhooks.delivery import enqueue_webhook

        return enqueue_webhook(
            self.redis,
            job_id=job_id,
            url=url,
            event=event,
            queue_name=queue_name,
            record_key=self.keys.webhook_attempts(job_id),
            record_ttl_s=self.settings.result_ttl_s,
        )

    # ------------------------------------------------------------------ transitions
    @translate_redis_errors
    def transition(
        self,
        job_id: str,
        allowed_from: Iterable[JobStatus],
        to: JobStatus,
        fields: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
    ) -> bool:
        """Set ``status=to`` (and ``fields``) iff the current status is in ``allowed_from``.

        Appends a ``status`` event to the job's stream in the same atomic step.
        Terminal states also start the job's result TTL.
        """
        args: list[Any] = [
            ",".join(s.value for s in allowed_from),
            to.value,
            json.dumps({"status": to.value, **(event or {})}),
            EVENTS_MAXLEN,
            "1" if to.terminal else "0",
            job_id,
        ]
        for k, v in (fields or {}).items():
            args += [k, v if isinstance(v, (str, int, float)) else json.dumps(v)]
        result = int(self._transition(keys=[self.keys.job(job_id), self.keys.events(job_id)], args=args))
        if result and to.terminal:
            self._finish_rq_job(job_id, to)
            if result == 2:  # DELETE /v1/jobs/{id} came while the job was live
                self.delete(job_id)
                return True
            pipe = self.redis.pipeline(transaction=False)
            for key in self.keys.all_job_keys(job_id):
                pipe.expire(key, self.settings.result_ttl_s)
            pipe.execute()
        return bool(result)

    def _finish_rq_job(self, job_id: str, status: JobStatus) -> None:
        rq_status = {
            JobStatus.SUCCEEDED: RQStatus.FINISHED,
            JobStatus.CANCELED: RQStatus.CANCELED,
        }.get(status, RQStatus.FAILED)
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - the RQ job may already have expired; ours is the record
            return
        pipe = self.redis.pipeline(transaction=False)
        job.set_status(rq_status, pipeline=pipe)
        job.cleanup(ttl=self.settings.result_ttl_s, pipeline=pipe, remove_from_queue=False)
        pipe.execute()

    @translate_redis_errors
    def add_event(self, job_id: str, type_: EventType, data: dict[str, Any]) -> None:
        self.redis.xadd(
            self.keys.events(job_id), {"type": type_.value, "data": json.dumps(data)}, maxlen=EVENTS_MAXLEN
        )

    # ------------------------------------------------------------------ a running job (worker side)
    @translate_redis_errors
    def cancel_requested(self, job_id: str) -> bool:
        """Whether a client asked to cancel the job (:meth:`cancel` sets the flag first)."""
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    @translate_redis_errors
    def set_batch(self, job_ids: Iterable[str], batch: dict[str, Any] | str) -> None:
        """Record the batch the jobs run in (the job view's ``batch``), one round trip."""
        value = batch if isinstance(batch, str) else json.dumps(batch)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hset(self.keys.job(job_id), "batch", value)
        pipe.execute()

    @translate_redis_errors
    def record_steps(
        self, progress: dict[str, tuple[int, int]], batch: dict[str, str] | None = None
    ) -> dict[str, bool]:
        """Write each job's progress ``(step, total)`` (hash and a ``progress`` event) and its new
        ``batch`` record if given, and read every job's cancel flag: one round trip for all jobs.

        Returns:
            job id -> whether a client asked to cancel it.
        """
        if not progress:
            return {}
        ids = list(progress)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            step, total = progress[job_id]
            pipe.hset(self.keys.job(job_id), mapping={"step": step, "total": total})
            pipe.xadd(
                self.keys.events(job_id),
                {"type": EventType.PROGRESS.value, "data": json.dumps({"step": step, "total": total})},
                maxlen=EVENTS_MAXLEN,
            )
            if batch and job_id in batch:
                pipe.hset(self.keys.job(job_id), "batch", batch[job_id])
        pipe.mget([self.keys.cancel(j) for j in ids])
        flags = pipe.execute()[-1]
        return {job_id: flag is not None for job_id, flag in zip(ids, flags, strict=True)}

    @translate_redis_errors
    def record_image(self, job_id: str, index: int, final_step: int | None = None) -> None:
        """Note that image ``index`` is stored (hash field and ``image`` event); with ``final_step``,
        first record the job's last step (a row can be decoded before its step was reported)."""
        key, events = self.keys.job(job_id), self.keys.events(job_id)
        pipe = self.redis.pipeline(transaction=False)
        if final_step is not None:
            pipe.hset(key, mapping={"step": final_step, "total": final_step})
            data = json.dumps({"step": final_step, "total": final_step})
            pipe.xadd(events, {"type": EventType.PROGRESS.value, "data": data}, maxlen=EVENTS_MAXLEN)
        pipe.hset(key, f"image:{index}", 1)
        pipe.xadd(events, {"type": EventType.IMAGE.value, "data": json.dumps({"index": index})}, maxlen=EVENTS_MAXLEN)
        pipe.execute()

    @translate_redis_errors
    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job at once, or flag a running one for its worker.

        Returns:
            The status after the call: ``canceled`` when the job was still queued,
            ``running`` when the worker was asked to drop it, or the terminal status
            it already had.
        """
        rec = self.get(job_id)
        status = JobStatus(rec["status"])
        if status.terminal:
            return status
        # Flag first: a worker claiming the job right now checks the flag before running.
        self.redis.set(self.keys.cancel(job_id), b"1", ex=self.settings.job_timeout_s + self.settings.queue_ttl_s)
        if status is JobStatus.QUEUED:
            removed = self.redis.lrem(self.queue(rec["model"], rec["priority"]).key, 0, job_id)
            if removed and self.transition(
                job_id, [JobStatus.QUEUED], JobStatus.CANCELED, {"finished_at": repr(time.time())}
            ):
                return JobStatus.CANCELED
        self.redis.hset(self.keys.job(job_id), "cancel_requested", 1)
        return JobStatus(self.get(job_id)["status"])

    @translate_redis_errors
    def expire_if_stale(self, job_id: str, rec: dict[str, str]) -> bool:
        """Lazily expire a job that waited longer than ``queue_ttl_s``."""
        if rec.get("status") != JobStatus.QUEUED.value:
            return False
        if time.time() - float(rec["created_at"]) <= self.settings.queue_ttl_s:
            return False
        self.redis.lrem(self.queue(rec["model"], rec["priority"]).key, 0, job_id)
        return self.transition(
            job_id,
            [JobStatus.QUEUED],
            JobStatus.EXPIRED,
            {
                "finished_at": repr(time.time()),
                "error": {"type": "expired", "message": f"waited more than queue_ttl_s={self.settings.queue_ttl_s}"},
            },
        )

    @translate_redis_errors
    def claim(self, job_id: str, worker: str, batch: dict[str, Any] | None = None) -> bool:
        """Move a queued job to ``running`` on ``worker``; False if it is no longer queued.

        The job joins the worker's running set *before* its status changes, so a worker
        that dies at any point leaves the job discoverable by :meth:`recover_dead_workers`.
        """
        rec = self.redis.hmget(self.keys.job(job_id), ["status", "attempts"])
        if _s(rec[0]) != JobStatus.QUEUED.value:
            self.redis.srem(self.keys.worker_jobs(worker), job_id)  # canceled / expired after the pop
            return False
        self.redis.sadd(self.keys.worker_jobs(worker), job_id)
        fields: dict[str, Any] = {
            "worker": worker,
            "started_at": repr(time.time()),
            "attempts": int(_s(rec[1]) or 0) + 1,
            "step": 0,
        }
        if batch is not None:
            fields["batch"] = batch
        if not self.transition(job_id, [JobStatus.QUEUED], JobStatus.RUNNING, fields):
            self.redis.srem(self.keys.worker_jobs(worker), job_id)
            return False
        try:
            Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).set_status(RQStatus.STARTED)
        except Exception:  # noqa: BLE001 - RQ bookkeeping only; our record is authoritative
            log.debug("could not mark RQ job %s started", job_id)
        return True

    @translate_redis_errors
    def release(self, worker: str, job_id: str) -> None:
        """Drop a finished job from the worker's running set."""
        self.redis.srem(self.keys.worker_jobs(worker), job_id)

    # ------------------------------------------------------------------ workers
    @translate_redis_errors
    def live_workers(self) -> list[WorkerInfo]:
        """Registered workers whose heartbeat has not expired."""
        raw = self.redis.hgetall(self.keys.workers)
        infos = [WorkerInfo.model_validate_json(v) for v in raw.values()]
        if not infos:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for info in infos:
            pipe.exists(self.keys.heartbeat(info.name))
        return [info for info, alive in zip(infos, pipe.execute(), strict=True) if alive]

    @translate_redis_errors
    def register_worker(self, info: WorkerInfo) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.keys.models, info.model)
        pipe.hset(self.keys.workers, info.name, info.model_dump_json())
        pipe.set(self.keys.heartbeat(info.name), repr(time.time()), px=int(self.settings.heartbeat_ttl_s * 1000))
        pipe.execute()

    @translate_redis_errors
    def heartbeat(self, info: WorkerInfo) -> None:
        """Refresh the heartbeat and the registry entry (re-creating it if a reaper removed it
        while this worker was starved of CPU)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.heartbeat(info.name), repr(time.time()), px=int(self.settings.heartbeat_ttl_s * 1000))
        pipe.hset(self.keys.workers, info.name, info.model_dump_json())
        pipe.execute()

    @translate_redis_errors
    def deregister_worker(self, worker: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.workers, worker)
        pipe.delete(self.keys.heartbeat(worker), self.keys.worker_jobs(worker))
        pipe.execute()

    @translate_redis_errors
    def add_warnings(self, job_id: str, warnings: list[str]) -> None:
        """Add notes shown in the job's ``warnings`` (e.g. a truncated prompt); a re-run adds no duplicates."""
        key = self.keys.job(job_id)
        current = _s(self.redis.hget(key, "warnings"))
        merged = list(dict.fromkeys([*(json.loads(current) if current else []), *warnings]))
        self.redis.hset(key, "warnings", json.dumps(merged))

    # ------------------------------------------------------------------ supervision (ldm-serve up)
    @translate_redis_errors
    def set_supervisor_note(self, child: str, text: str | None) -> None:
        """Record why ``child`` is down and being restarted; ``None`` clears it."""
        if text is None:
            self.redis.hdel(self.keys.supervisor, child)
        else:
            self.redis.hset(self.keys.supervisor, child, text)

    @translate_redis_errors
    def expire_workers_of_process(self, host: str, pid: int) -> list[str]:
        """Drop the heartbeat of the workers registered by process ``pid`` on ``host`` (known dead),
        so that readiness and :meth:`recover_dead_workers` need not wait for the heartbeat TTL."""
        names = [
            info.name
            for info in (WorkerInfo.model_validate_json(v) for v in self.redis.hvals(self.keys.workers))
            if info.pid == pid and info.host == host
        ]
        if names:
            self.redis.delete(*(self.keys.heartbeat(n) for n in names))
        return names

    @translate_redis_errors
    def clear_supervisor_notes(self) -> None:
        self.redis.delete(self.keys.supervisor)

    @translate_redis_errors
    def supervisor_notes(self) -> list[str]:
        """The supervisor's current notes, e.g. ``worker restarting after exit code -9, attempt 2``."""
        raw = self.redis.hgetall(self.keys.supervisor)
        return [_s(raw[k]) or "" for k in sorted(raw)]

    @translate_redis_errors
    def recover_dead_workers(self) -> list[str]:
        """Re-queue (or fail, after ``max_attempts``) the jobs of workers whose heartbeat expired.

        Safe to call from any process at any time: a lock per dead worker makes one
        caller do the work. Returns the ids of the jobs it touched.
        """
        touched: list[str] = []
        names = [_s(n) for n in self.redis.hkeys(self.keys.workers)]
        for name in names:
            assert name is not None
            if self.redis.exists(self.keys.heartbeat(name)):
                continue
            if not self.redis.set(self.keys.reap_lock(name), b"1", nx=True, ex=30):
                continue
            touched += self.recover_jobs_of(name)
            self.redis.hdel(self.keys.workers, name)
            self.redis.delete(self.keys.worker_jobs(name))
            log.warning("worker %s stopped heartbeating; recovered %d job(s)", name, len(touched))
        return touched

    @translate_redis_errors
    def recover_jobs_of(self, worker: str) -> list[str]:
        """Re-queue (or fail) every job ``worker`` holds as running; also used by a live
        worker that lost Redis in the middle of a batch and cannot vouch for its jobs."""
        touched = []
        for raw_id in self.redis.smembers(self.keys.worker_jobs(worker)):
            job_id = raw_id.decode()
            touched.append(job_id)
            self._recover_job(job_id, worker)
            self.redis.srem(self.keys.worker_jobs(worker), job_id)
        return touched

    def _recover_job(self, job_id: str, worker: str) -> None:
        try:
            rec = self.get(job_id)
        except JobNotFound:
            return
        if rec["status"] == JobStatus.QUEUED.value:
            # taken out of its queue by ``worker`` (atomically with joining its running
            # set) but never claimed: put it back at the front unless it is there already
            queue = self.queue(rec["model"], rec["priority"])
            if self.redis.lpos(queue.key, job_id) is None:
                queue.push_job_id(job_id, at_front=True)
                log.warning("job %s was taken by %s but never started; re-queued", job_id, worker)
            return
        if rec["status"] != JobStatus.RUNNING.value or rec.get("worker") != worker:
            return
        attempts = int(rec.get("attempts", "0"))
        reason = f"worker {worker} stopped heartbeating while running this job (attempt {attempts})"
        if rec.get("cancel_requested") == "1":
            self.transition(job_id, [JobStatus.RUNNING], JobStatus.CANCELED, {"finished_at": repr(time.time())})
        elif attempts < self.settings.max_attempts:
            if self.transition(
                job_id,
                [JobStatus.RUNNING],
                JobStatus.QUEUED,
                {"step": 0, "worker": "", "requeued_reason": reason},
                event={"reason": reason},
            ):
                self.queue(rec["model"], rec["priority"]).push_job_id(job_id, at_front=True)
        else:
            self.transition(
                job_id,
                [JobStatus.RUNNING],
                JobStatus.FAILED,
                {
                    "finished_at": repr(time.time()),
                    "error": {"type": "worker_lost", "message": f"{reason}; max_attempts reached"},
                },
                event={"error": {"type": "worker_lost", "message": reason}},
            )

    # ------------------------------------------------------------------ listing and deletion
    def owner_index_horizon(self) -> float:
        """Jobs created before this unix time have expired from Redis whatever happened to them."""
        s = self.settings
        return time.time() - (s.queue_ttl_s + s.job_timeout_s * s.max_attempts + s.result_ttl_s + 60)

    @translate_redis_errors
    def list_jobs(
        self,
        owner: str | None,
        *,
        limit: int,
        statuses: frozenset[str] | None = None,
        after: tuple[float, str] | None = None,
        scan_max: int = 1000,
    ) -> tuple[list[dict[str, str]], tuple[float, str] | None]:
        """An owner's job records, newest first, from the owner index (``Keys.owner_jobs``).

        Args:
            owner: the owner id (None: anonymous jobs).
            limit: most records returned.
            statuses: only jobs in these statuses.
            after: continue after this ``(created_at, job_id)`` (the cursor of the previous page).
            scan_max: most index entries examined in one call (a status filter may skip many).

        Returns:
            ``(records, cursor)``; ``cursor`` is None when the index is exhausted, else the
            position to pass as ``after`` for the next page. Entries whose job expired or was
            deleted are pruned from the index on the way.
        """
        key = self.keys.owner_jobs(owner)
        self.redis.zremrangebyscore(key, "-inf", self.owner_index_horizon())
        top: float | str = "+inf" if after is None else after[0]
        out: list[dict[str, str]] = []
        stale: list[str] = []
        offset, scanned = 0, 0
        cursor: tuple[float, str] | None = None
        try:
            while True:
                entries = self.redis.zrevrangebyscore(
                    key, top, "-inf", start=offset, num=max(2 * limit, 50), withscores=True
                )
                if not entries:
                    return out, None
                offset += len(entries)
                pipe = self.redis.pipeline(transaction=False)
                for raw_id, _score in entries:
                    pipe.hgetall(self.keys.job(raw_id.decode()))
                for (raw_id, score), raw in zip(entries, pipe.execute(), strict=True):
                    job_id = raw_id.decode()
                    if after is not None and score == after[0] and job_id >= after[1]:
                        continue  # returned on an earlier page (equal scores come in descending id order)
                    scanned += 1
                    cursor = (float(score), job_id)
                    if not raw or b"payload" not in raw:
                        stale.append(job_id)
                        continue
                    rec = {k.decode(): v.decode() for k, v in raw.items()}
                    if statuses is None or rec.get("status") in statuses:
                        out.append(rec)
                    if len(out) >= limit or scanned >= scan_max:
                        return out, cursor
        finally:
            if stale:
                self.redis.zrem(key, *stale)

    @translate_redis_errors
    def request_delete(self, job_id: str) -> None:
        """Delete the job as soon as it reaches a terminal status (see :meth:`transition`).

        Raises JobNotFound if the job is already gone (never re-creates a partial record).
        """
        check_job_id(job_id)
        if not self._flag_if_exists(keys=[self.keys.job(job_id)], args=["delete_requested"]):
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")

    @translate_redis_errors
    def delete(self, job_id: str) -> bool:
        """Remove a job's record, events, images, inputs, webhook log, RQ job and index entries.

        The caller cancels a live job first. Returns False if the job did not exist.
        """
        check_job_id(job_id)
        raw = self.redis.hmget(self.keys.job(job_id), ["payload", "owner", "quota_key", "model", "priority"])
        if raw[0] is None:
            return False
        payload = GenerationPayload.model_validate_json(raw[0])
        keys = [
            *self.keys.all_job_keys(job_id),
            *(self.keys.image(job_id, i) for i in range(payload.n)),
            self.keys.input(job_id, "image"),
            self.keys.input(job_id, "mask"),
            Job.key_for(job_id),
        ]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*keys)
        pipe.zrem(self.keys.owner_jobs(payload.owner), job_id)
        if _s(raw[2]):
            pipe.zrem(_s(raw[2]), job_id)
        pipe.lrem(self.queue(payload.model, payload.priority).key, 0, job_id)
        pipe.execute()
        return True


def check_job_id(job_id: str) -> None:
    """Raise JobNotFound for an id that :func:`~ldm_serve.contract.new_job_id` cannot have made.

    Guards every read keyed by a client-supplied id: ``<id>:events`` and the like must
    never reach Redis as part of a key (they would address another key of the job).
    """
    if not is_job_id(job_id):
        raise JobNotFound(
            f"job_id: {str(job_id)[:64]!r} is not a job id (26 lower-case base32 characters); no such job"
        )


def _split_idempotent(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    job_id, _, fingerprint = value.partition(" ")
    return job_id, fingerprint


def check_idempotent_reuse(existing: tuple[str, str], fingerprint: str) -> None:
    """Refuse an Idempotency-Key reused with a different request body (IETF
    draft-ietf-httpapi-idempotency-key-header: 422)."""
    if existing[1] and fingerprint and existing[1] != fingerprint:
        raise InvalidInput(
            "Idempotency-Key",
            f"was already used for job {existing[0]} with a different request body; use a new key",
        )


def terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES
