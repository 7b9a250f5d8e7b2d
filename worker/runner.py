"""Running one batch of claimed jobs through ``pipeline.generate`` (``Settings.batching = "request"``).

A batch is a list of jobs with the same model and size. Each job contributes
``n`` rows (one per image and seed). Before sampling, every row goes through
``pipeline.validate_row`` once (:meth:`worker.jobs.JobBook.prepare`): a job with a bad
row fails alone and its batch-mates still run; ``generate`` is then told not to validate
again. During sampling, ``on_step`` writes every job's progress, checks the jobs' cancel
flags and run-time limits, and returns the rows to drop; ``on_image`` stores each image
as soon as it is decoded and finishes a job when its last image is stored. The job
bookkeeping itself (Redis, metrics, webhooks) is :class:`worker.jobs.JobBook`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ldm_serve.contract import JobStatus, WebhookEventType
from ldm_serve.jobstore import JobStore
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings
from worker.jobs import JobBook, JobRun, error_of
from worker.metrics import WorkerMetrics
from worker.webhook_events import WebhookEmitter

log = logging.getLogger(__name__)

__all__ = ["BatchRunner", "JobRun"]


class BatchRunner:
    """Runs request-level batches for one worker.

    Args:
        pipeline: a loaded ``ldm.pipeline.LatentDiffusionPipeline``.
        store: the job store.
        results: where images go.
        settings: the worker's settings.
        metrics: the worker's metrics.
        webhooks: the webhook event emitter.
        worker_name: this worker's registry name.
        row_factory: builds a row (default ``ldm.pipeline.GenerationRow``; tests pass a stand-in).
        book: the job bookkeeping (default: one built from the arguments above).
    """

    def __init__(
        self,
        pipeline: Any,
        store: JobStore,
        results: ResultStore,
        settings: Settings,
        metrics: WorkerMetrics,
        webhooks: WebhookEmitter,
        worker_name: str,
        row_factory: Callable[..., Any] | None = None,
        book: JobBook | None = None,
    ) -> None:
        self.book = book or JobBook(pipeline, store, results, settings, metrics, webhooks, worker_name, row_factory)
        self.pipeline = pipeline
        self.metrics = metrics
        self.model = pipeline.name

    @property
    def row_factory(self) -> Callable[..., Any]:
        return self.book.row_factory

    @property
    def results(self) -> ResultStore:
        return self.book.results

    # ------------------------------------------------------------------ entry point
    def run(self, job_ids: Sequence[str]) -> None:
        """Claim ``job_ids`` (already removed from their queue), then validate and sample them."""
        batch_id = uuid.uuid4().hex[:12]
        runs: list[JobRun] = []
        for job_id in job_ids:
            run = self.book.claim(job_id, batch_id)
            if run is not None:
                runs.append(run)
        runs = [r for r in runs if self.book.prepare(r, validate=True)]
        if not runs:
            return
        self._sample(runs, batch_id)

    # ------------------------------------------------------------------ sampling
    def _sample(self, runs: list[JobRun], batch_id: str) -> None:
        book = self.book
        rows: list[Any] = []
        owner: list[tuple[JobRun, int]] = []  # batch row -> (job, image index)
        for run in runs:
            for i, row in enumerate(run.rows):
                run.row_index.append(len(rows))
                rows.append(row)
                owner.append((run, i))
        width, height = runs[0].payload.width, runs[0].payload.height
        book.store.set_batch([run.job_id for run in runs], {"id": batch_id, "jobs": len(runs), "rows": len(rows)})
        for run in runs:
            book.webhook(run, WebhookEventType.START)
        now = time.time()
        for run in runs:
            self.metrics.queue_to_first_step.labels(self.model).observe(max(0.0, now - run.payload.created_at))
        self.metrics.batch_rows.labels(self.model).observe(len(rows))
        self.metrics.batch_jobs.labels(self.model).observe(len(runs))
        log.info("batch %s: %d job(s), %d row(s), %dx%d", batch_id, len(runs), len(rows), width, height)

        last_step = [time.monotonic(), False]  # time of the previous callback, whether a step ran

        def on_step(progress: list[Any]) -> Iterable[int] | None:
            now = time.monotonic()
            if last_step[1]:
                self.metrics.step_seconds.labels(self.model).observe(now - last_step[0])
            last_step[0], last_step[1] = now, True
            return self._on_step(progress, owner)

        def on_image(row: int, image: Any) -> None:
            self.metrics.decode_seconds.labels(self.model).observe(time.monotonic() - last_step[0])
            run, index = owner[row]
            book.store_image(run, index, image)

        self.metrics.busy.set(1)
        try:  # the rows were validated by JobBook.prepare
            self.pipeline.generate(rows, width, height, on_step=on_step, on_image=on_image, validate=False)
        except Exception as exc:  # noqa: BLE001 - isolate: retry jobs one by one, then fail the culprit
            open_runs = [r for r in runs if not r.closed]
            if len(open_runs) > 1:
                log.warning("batch %s failed; re-running its %d jobs one by one", batch_id, len(open_runs),
                            exc_info=True)
                for run in open_runs:
                    run.row_index.clear()
                    run.images_done = 0
                    self._sample([run], batch_id + "-solo")
                return
            log.error("job(s) of batch %s failed", batch_id, exc_info=True)
            error = error_of(exc)
            for run in open_runs:
                book.close(run, JobStatus.FAILED, error=error)
            return
        finally:
            self.metrics.busy.set(0)
        for run in runs:
            if not run.closed:  # rows dropped without a recorded reason: never leave a job running
                book.fail_internal(run, "no image produced")

    def _on_step(self, progress: list[Any], owner: list[tuple[JobRun, int]]) -> list[int]:
        """Write progress, then return the rows of jobs that were canceled or ran out of time."""
        per_job: dict[str, tuple[JobRun, int, int]] = {}
        for p in progress:
            run, _ = owner[p.row]
            if not run.closed and run.job_id not in per_job:
                per_job[run.job_id] = (run, p.step, p.total)
        return [row for run in self.book.progress_and_stops(per_job) for row in run.row_index]
