"""Running jobs through the continuous-batching engine (``Settings.batching = "continuous"``).

The worker's loop calls :meth:`ContinuousRunner.admit` with jobs it took from the
queue (atomically into its running set, see :mod:`worker.batching`) and
:meth:`ContinuousRunner.step` once per DDIM step. Jobs join the engine's running
batch at the next step boundary and leave it when their last image is stored, so
a job submitted while others run starts within one step when there is room.

Per step, in one Redis round trip: every running job's progress, its cancel
flag and its run-time limit. A canceled or timed-out job's rows leave the batch
at once; a job whose rows fail (preparation, the UNet, decoding) fails alone
while the others go on (the engine retries the step group by group). An error
outside the engine never kills the worker: the affected jobs fail and the engine
starts afresh.

A job's ``batch`` record names the engine session it ran in (from idle to idle)
and the most jobs and rows that shared a step with it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ldm_serve.contract import JobStatus, WebhookEventType
from ldm_serve.errors import LdmServeError
from ldm_serve.jobstore import JobStore
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings
from worker.jobs import JobBook, JobRun, error_of
from worker.metrics import WorkerMetrics
from worker.webhook_events import WebhookEmitter

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> Any:
    """The admission configuration the settings describe."""
    from ldm.engine.admission import AdmissionConfig

    budget = settings.engine_memory_budget_mb
    return AdmissionConfig(
        max_rows=settings.max_batch_rows,
        max_bytes=None if budget is None else int(budget * 2**20),
        buckets=tuple(settings.engine_buckets),
        waiting_served_ratio=settings.engine_waiting_served_ratio,
        max_waiting_steps=settings.engine_max_waiting_steps,
    )


class ContinuousRunner:
    """Feeds claimed jobs into a :class:`ldm.engine.engine.ContinuousBatchEngine` and
    records what each step did (through a :class:`worker.jobs.JobBook`, as
    :class:`worker.runner.BatchRunner` does). Arguments as :class:`worker.runner.BatchRunner`,
    plus ``engine`` (default: built from the pipeline and ``settings``)."""

    def __init__(
        self,
        pipeline: Any,
        store: JobStore,
        results: ResultStore,
        settings: Settings,
        metrics: WorkerMetrics,
        webhooks: WebhookEmitter,
        worker_name: str,
        row_factory: Any = None,
        engine: Any = None,
        book: JobBook | None = None,
    ) -> None:
        self.book = book or JobBook(pipeline, store, results, settings, metrics, webhooks, worker_name, row_factory)
        self.metrics = metrics
        self.model = pipeline.name
        if engine is None:
            from ldm.engine.engine import ContinuousBatchEngine, estimate_unet_row_bytes

            row_bytes = None
            if settings.engine_memory_budget_mb is not None:
                def row_bytes(width: int, height: int) -> int:
                    return estimate_unet_row_bytes(pipeline, width, height)

            engine = ContinuousBatchEngine(pipeline, engine_config(settings), unet_row_bytes=row_bytes)
        self.engine = engine
        self.jobs: dict[str, JobRun] = {}
        self.batch_key: str | None = None  # the queue batch key of the running jobs
        self.session: str | None = None  # engine session id (idle to idle), shown as the jobs' batch id
        self._peak: dict[str, tuple[int, int]] = {}  # job -> most (jobs, rows) that shared a step with it

    # ------------------------------------------------------------------ state
    @property
    def idle(self) -> bool:
        return self.engine.idle

    def room(self) -> int:
        """Rows the worker may take from the queue now."""
        return self.engine.room()

    def reset(self) -> list[str]:
        """Forget every job (their outcome is handed to dead-worker recovery, e.g. after losing Redis)."""
        dropped = self.engine.reset()
        self.jobs.clear()
        self._peak.clear()
        self.batch_key = self.session = None
        self._gauges()
        return dropped

    # ------------------------------------------------------------------ admission
    def admit(self, job_ids: Sequence[str], batch_key: str) -> None:
        """Claim jobs already taken from their queue, validate their rows and queue them in the engine."""
        if self.session is None:
            self.session = uuid.uuid4().hex[:12]
        book = self.book
        for job_id in job_ids:
            run = book.claim(job_id, self.session)
            if run is None or not book.prepare(run, validate=False):  # engine.add validates the rows
                continue
            p = run.payload
            try:
                self.engine.add(job_id, run.rows, p.width, p.height)
            except LdmServeError as exc:
                log.info("job %s rejected by the model: %s", job_id, exc)
                book.close(run, JobStatus.FAILED, error=exc.to_dict())
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a size the running batch cannot take
                log.warning("job %s could not join the running batch", job_id, exc_info=True)
                book.close(run, JobStatus.FAILED, error=error_of(exc))
                continue
            self.jobs[job_id] = run
            self.batch_key = batch_key
            book.webhook(run, WebhookEventType.START)
        if self.engine.idle:
            self.session = self.batch_key = None
        self._gauges()

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """One engine step, then its consequences in Redis: failures, images, progress, cancels."""
        if self.engine.idle:
            return
        book = self.book
        self.metrics.busy.set(1)
        t0 = time.monotonic()
        try:
            rep = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - an engine bug must not kill the worker
            log.error("engine step failed; failing its %d job(s)", len(self.jobs), exc_info=True)
            for run in list(self.jobs.values()):
                book.close(run, JobStatus.FAILED, error=error_of(exc))
            self.reset()
            return
        finally:
            self.metrics.busy.set(0)
        self._observe(rep, time.monotonic() - t0)

        for group, exc in rep.failed:
            run = self.jobs.pop(group, None)
            if run is not None:
                log.warning("job %s failed in the engine: %s", group, exc)
                book.close(run, JobStatus.FAILED, error=error_of(exc))
                self.metrics.engine_failed_groups.labels(self.model).inc()

        now = time.time()
        for adm in rep.admitted:
            run = self.jobs.get(adm.id)
            if run is not None:
                self.metrics.queue_to_first_step.labels(self.model).observe(max(0.0, now - run.payload.created_at))

        jobs_in_step = len(rep.progress)
        changed: dict[str, str] = {}  # job -> its new batch record
        for prog in rep.progress:
            peak = self._peak.get(prog.group, (0, 0))
            new = (max(peak[0], jobs_in_step), max(peak[1], rep.rows))
            if new != peak:
                self._peak[prog.group] = new
                changed[prog.group] = self._batch_info(new)

        for im in rep.images:  # before progress: a finished job closes here
            run = self.jobs.get(im.group)
            if run is not None:
                if im.group in changed:
                    book.store.set_batch([im.group], changed.pop(im.group))
                book.store_image(run, im.index, im.image)

        per_job = {
            p.group: (self.jobs[p.group], p.step, p.total)
            for p in rep.progress
            if p.group in self.jobs and not self.jobs[p.group].closed
        }
        for run in book.progress_and_stops(per_job, changed):
            self.engine.cancel(run.job_id)  # canceled or timed out: its rows leave the batch now

        for group in rep.finished:
            run = self.jobs.get(group)
            if run is not None and not run.closed:  # every row decoded but not every image stored
                book.fail_internal(run, "no image produced")
        for job_id in [j for j, run in self.jobs.items() if run.closed]:
            del self.jobs[job_id]
            self._peak.pop(job_id, None)
            self.engine.cancel(job_id)  # no-op unless it was closed from outside the engine
        if self.engine.idle:
            self.session = self.batch_key = None
        self._gauges()

    # ------------------------------------------------------------------ bookkeeping
    def _batch_info(self, peak: tuple[int, int]) -> str:
        return json.dumps({"id": self.session, "jobs": peak[0], "rows": peak[1], "mode": "continuous"})

    def _observe(self, rep: Any, seconds: float) -> None:
        m, model = self.metrics, self.model
        m.engine_step_seconds.labels(model).observe(seconds)
        if rep.plan is not None:
            m.engine_admitted_rows.labels(model).inc(sum(a.rows for a in rep.admitted))
            m.engine_padded_rows.labels(model).inc(rep.plan.padded)
        if rep.rows:
            m.step_seconds.labels(model).observe(rep.denoise_s)
            m.batch_rows.labels(model).observe(rep.rows)
            m.batch_jobs.labels(model).observe(len(rep.progress))
        if rep.images:
            m.decode_seconds.labels(model).observe(rep.decode_s)

    def _gauges(self) -> None:
        self.metrics.engine_running_rows.labels(self.model).set(self.engine.running_rows)
        self.metrics.engine_waiting_rows.labels(self.model).set(self.engine.admission.waiting_rows)
