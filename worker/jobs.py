"""Job bookkeeping shared by both batching modes: claim, prepare, progress, images, close.

:class:`JobBook` is the one object that records what happens to a job in Redis (through
:class:`~ldm_serve.jobstore.JobStore`, never the client directly): claiming it, building
its engine rows from the payload (:meth:`GenerationPayload.row_kwargs`), writing progress
and reading cancel flags once per step, storing images and closing the job with its
terminal status, metrics and webhook. :class:`worker.runner.BatchRunner` (request-level
batches) and :class:`worker.continuous.ContinuousRunner` (the continuous engine) each hold
one and differ only in how they drive the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, OutputFormat, WebhookEventType
from ldm_serve.errors import InternalError, InvalidInput, LdmServeError
from ldm_serve.jobstore import JobStore
from ldm_serve.limits import img2img_steps
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings
from worker.encode import decode_input, encode_image
from worker.metrics import WorkerMetrics
from worker.webhook_events import WebhookEmitter

log = logging.getLogger(__name__)


@dataclass
class JobRun:
    """Book-keeping for one running job."""

    payload: GenerationPayload
    rows: list[Any] = field(default_factory=list)  # GenerationRow per image
    row_index: list[int] = field(default_factory=list)  # indices into the batch's row list (request mode)
    started: float = field(default_factory=time.time)
    images_done: int = 0
    last_step: int = 0  # last progress written
    closed: bool = False  # reached a terminal status

    @property
    def job_id(self) -> str:
        return self.payload.job_id


def error_of(exc: BaseException) -> dict[str, Any]:
    """The job record's ``error`` for an exception: its own description for ours, else an internal error."""
    if isinstance(exc, LdmServeError):
        return exc.to_dict()
    return InternalError(str(exc) or type(exc).__name__).to_dict()


class JobBook:
    """Records the jobs one worker runs.

    Args:
        pipeline: the loaded model (``step_count``, ``validate_row``, ``prompt_warnings``).
        store: the job store (the only way to Redis for job state).
        results: where images go.
        settings: the worker's settings.
        metrics: the worker's metrics.
        webhooks: the webhook event emitter.
        worker_name: this worker's registry name.
        row_factory: builds a row from keyword arguments (default ``ldm.pipeline.GenerationRow``).
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
    ) -> None:
        if row_factory is None:
            from ldm.pipeline import GenerationRow  # the model stack is imported only by the worker

            row_factory = GenerationRow
        self.row_factory = row_factory
        self.pipeline = pipeline
        self.store = store
        self.results = results
        self.settings = settings
        self.metrics = metrics
        self.webhooks = webhooks
        self.worker = worker_name
        self.model = pipeline.name

    # ------------------------------------------------------------------ claiming and rows
    def claim(self, job_id: str, batch_id: str) -> JobRun | None:
        """Mark a job taken from the queue ``running`` on this worker; None if it must not run
        (vanished, expired, no longer queued, or canceled before it started)."""
        try:
            payload = self.store.payload(job_id)
        except LdmServeError:
            log.warning("job %s vanished before it could start", job_id)
            return None
        if self.store.expire_if_stale(job_id, self.store.get(job_id)):
            self.metrics.jobs_finished.labels(self.model, JobStatus.EXPIRED.value).inc()
            return None
        if not self.store.claim(job_id, self.worker, batch={"id": batch_id}):
            return None
        run = JobRun(payload)
        self.metrics.queue_wait.labels(self.model).observe(max(0.0, time.time() - payload.created_at))
        if self.store.cancel_requested(job_id):
            self.close(run, JobStatus.CANCELED)
            return None
        return run

    def prepare(self, run: JobRun, *, validate: bool) -> bool:
        """Build the job's rows from its payload (and, with ``validate``, check each with
        ``pipeline.validate_row``); fail the job alone if that is impossible."""
        p = run.payload
        try:
            inputs: dict[str, Any] = {"image": None, "mask": None}
            for name in p.kind.inputs:  # inpainting: image and mask; img2img: image
                data = self.results.get_input(p.job_id, name)
                if data is None:
                    raise InvalidInput(name, f"the uploaded {p.kind.value} inputs have expired")
                inputs[name] = decode_input(data)
            image, mask = inputs["image"], inputs["mask"]
            shared = p.row_kwargs()
            for seed in p.seeds:
                row = self.row_factory(**shared, seed=seed, image=image, mask=mask)
                if validate:
                    self.pipeline.validate_row(row, p.width, p.height)
                run.rows.append(row)
            warnings = _prompt_warnings(self.pipeline, run.rows[0]) if run.rows else []
            if warnings:  # the rows share their prompts
                log.info("job %s: %s", p.job_id, "; ".join(warnings))
                self.store.add_warnings(p.job_id, warnings)
        except LdmServeError as exc:
            log.info("job %s rejected by the model: %s", p.job_id, exc)
            self.close(run, JobStatus.FAILED, error=exc.to_dict())
            return False
        except Exception as exc:  # noqa: BLE001 - an input we could not even decode fails its job only
            log.warning("job %s could not be prepared", p.job_id, exc_info=True)
            self.close(run, JobStatus.FAILED, error={"type": "invalid_input", "message": str(exc)})
            return False
        return True

    # ------------------------------------------------------------------ per step
    def progress_and_stops(
        self, per_job: dict[str, tuple[JobRun, int, int]], batch: dict[str, str] | None = None
    ) -> list[JobRun]:
        """Write each job's progress (and new ``batch`` record), read the cancel flags, enforce
        ``job_timeout_s``; close and return the jobs that must stop. One Redis round trip."""
        if not per_job:
            return []
        for run, step, _total in per_job.values():
            run.last_step = step
        flags = self.store.record_steps({j: (step, total) for j, (_run, step, total) in per_job.items()}, batch)
        drop: list[JobRun] = []
        now = time.time()
        for job_id, canceled in flags.items():
            run = per_job[job_id][0]
            if canceled:
                self.close(run, JobStatus.CANCELED)
            elif now - run.started > self.settings.job_timeout_s:
                self.close(run, JobStatus.FAILED, error={
                    "type": "timeout", "message": f"ran longer than job_timeout_s={self.settings.job_timeout_s}"})
            else:
                self.webhook(run, WebhookEventType.PROGRESS)
                continue
            drop.append(run)
        return drop

    def store_image(self, run: JobRun, index: int, image: Any) -> None:
        """Encode and store one image; the job succeeds with its last one."""
        if run.closed:
            return
        p = run.payload
        total = self.pipeline.step_count(p.steps)
        if p.kind is JobKind.IMG2IMG:
            total = img2img_steps(total, p.strength)  # the steps that ran (the row_step_count of its rows)
        final_step = None
        if run.last_step < total:  # a row can be decoded before the step callback reports its last step
            run.last_step = final_step = total
        data = encode_image(image, OutputFormat(p.output_format), p.quality)
        lifetime = self.settings.result_ttl_s + self.settings.job_timeout_s
        self.results.put_image(p.job_id, index, data, lifetime)
        self.store.record_image(p.job_id, index, final_step)
        self.metrics.images.labels(self.model).inc()
        run.images_done += 1
        if run.images_done == p.n:
            self.close(run, JobStatus.SUCCEEDED)

    # ------------------------------------------------------------------ finishing
    def close(self, run: JobRun, status: JobStatus, error: dict[str, Any] | None = None) -> None:
        """Record a job's terminal status (once) and release it from this worker."""
        if run.closed:
            return
        run.closed = True
        now = time.time()
        fields: dict[str, Any] = {"finished_at": repr(now)}
        if error is not None:
            fields["error"] = error
        self.store.transition(
            run.job_id, [JobStatus.RUNNING], status, fields, event={"error": error} if error else None
        )
        self.store.release(self.worker, run.job_id)
        self.results.expire_job(run.job_id, run.payload.n, self.settings.result_ttl_s)
        self.metrics.jobs_finished.labels(self.model, status.value).inc()
        if status is JobStatus.SUCCEEDED:
            self.metrics.run_time.labels(self.model).observe(now - run.started)
            self.metrics.e2e.labels(self.model).observe(now - run.payload.created_at)
        self.webhook(run, WebhookEventType.COMPLETED)

    def fail_internal(self, run: JobRun, message: str) -> None:
        """Fail a job because an internal invariant broke (logged, recorded as ``internal_error``)."""
        log.error("job %s: internal error: %s", run.job_id, message)
        self.close(run, JobStatus.FAILED, error=InternalError(message).to_dict())

    def webhook(self, run: JobRun, event: WebhookEventType) -> None:
        try:
            self.webhooks.emit(run.payload, event)
        except Exception:  # noqa: BLE001 - a webhook problem never fails the job
            log.warning("could not enqueue %s webhook for job %s", event.value, run.job_id, exc_info=True)


def _prompt_warnings(pipeline: Any, row: Any) -> list[str]:
    """The pipeline's notes on a row's prompts (truncation); none from pipelines without the hook."""
    hook = getattr(pipeline, "prompt_warnings", None)
    return list(hook(row)) if hook is not None else []
