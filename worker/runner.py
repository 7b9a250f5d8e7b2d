"""Running one batch of claimed jobs through ``pipeline.generate``.

A batch is a list of jobs with the same model and size. Each job contributes
``n`` rows (one per image and seed). Before sampling, every row goes through
``pipeline.validate_row``: a job with a bad row fails alone and its batch-mates
still run. During sampling, ``on_step`` writes every job's progress, checks the
jobs' cancel flags and run-time limits, and returns the rows to drop; ``on_image``
stores each image as soon as it is decoded and finishes a job when its last
image is stored.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldm_serve.contract import (
    EventType,
    GenerationPayload,
    JobKind,
    JobStatus,
    OutputFormat,
    WebhookEventType,
)
from ldm_serve.errors import InvalidInput, LdmServeError
from ldm_serve.jobstore import JobStore
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings
from worker.encode import decode_input, encode_image
from worker.metrics import WorkerMetrics
from worker.webhook_events import WebhookEmitter

log = logging.getLogger(__name__)


@dataclass
class JobRun:
    """Book-keeping for one job inside a batch."""

    payload: GenerationPayload
    rows: list[Any] = field(default_factory=list)  # GenerationRow per image
    row_index: list[int] = field(default_factory=list)  # indices into the batch's row list
    started: float = field(default_factory=time.time)
    images_done: int = 0
    last_step: int = 0  # last progress written
    closed: bool = False  # reached a terminal status

    @property
    def job_id(self) -> str:
        return self.payload.job_id


class BatchRunner:
    """Runs batches for one worker.

    Args:
        pipeline: a loaded ``ldm.pipeline.LatentDiffusionPipeline``.
        store: the job store.
        results: where images go.
        settings: the worker's settings.
        metrics: the worker's metrics.
        webhooks: the webhook event emitter.
        worker_name: this worker's registry name.
        row_factory: builds a row (default ``ldm.pipeline.GenerationRow``; tests pass a stand-in).
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
        row_factory: Any = None,
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

    # ------------------------------------------------------------------ entry point
    def run(self, job_ids: Sequence[str]) -> None:
        """Claim ``job_ids`` (already removed from their queue), then validate and sample them."""
        batch_id = uuid.uuid4().hex[:12]
        runs: list[JobRun] = []
        for job_id in job_ids:
            run = self._claim(job_id, batch_id)
            if run is not None:
                runs.append(run)
        runs = [r for r in runs if self._prepare(r)]
        if not runs:
            return
        self._sample(runs, batch_id)

    # ------------------------------------------------------------------ claiming and validation
    def _claim(self, job_id: str, batch_id: str) -> JobRun | None:
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
        if self.store.redis.exists(self.store.keys.cancel(job_id)):
            self._close(run, JobStatus.CANCELED)
            return None
        return run

    def _prepare(self, run: JobRun) -> bool:
        """Build and validate the job's rows; fail the job alone if any row is invalid."""
        p = run.payload
        try:
            image = mask = None
            if p.kind is JobKind.INPAINT:
                image_bytes = self.results.get_input(p.job_id, "image")
                mask_bytes = self.results.get_input(p.job_id, "mask")
                if image_bytes is None or mask_bytes is None:
                    raise InvalidInput("image", "the uploaded inpainting inputs have expired")
                image, mask = decode_input(image_bytes), decode_input(mask_bytes)
            for seed in p.seeds:
                row = self.row_factory(
                    prompt=p.prompt,
                    seed=seed,
                    negative_prompt=p.negative_prompt,
                    steps=p.steps,
                    guidance_scale=p.guidance_scale,
                    eta=p.eta,
                    image=image,
                    mask=mask,
                )
                self.pipeline.validate_row(row, p.width, p.height)
                run.rows.append(row)
            warnings = _prompt_warnings(self.pipeline, run.rows[0]) if run.rows else []
            if warnings:  # the rows share their prompts
                log.info("job %s: %s", p.job_id, "; ".join(warnings))
                self.store.add_warnings(p.job_id, warnings)
        except LdmServeError as exc:
            log.info("job %s rejected by the model: %s", p.job_id, exc)
            self._close(run, JobStatus.FAILED, error=exc.to_dict())
            return False
        except Exception as exc:  # noqa: BLE001 - an input we could not even decode fails its job only
            log.warning("job %s could not be prepared", p.job_id, exc_info=True)
            self._close(run, JobStatus.FAILED, error={"type": "invalid_input", "message": str(exc)})
            return False
        return True

    # ------------------------------------------------------------------ sampling
    def _sample(self, runs: list[JobRun], batch_id: str) -> None:
        rows: list[Any] = []
        owner: list[tuple[JobRun, int]] = []  # batch row -> (job, image index)
        for run in runs:
            for i, row in enumerate(run.rows):
                run.row_index.append(len(rows))
                rows.append(row)
                owner.append((run, i))
        width, height = runs[0].payload.width, runs[0].payload.height
        batch_info = {"id": batch_id, "jobs": len(runs), "rows": len(rows)}
        for run in runs:
            self.store.redis.hset(self.store.keys.job(run.job_id), "batch", _json(batch_info))
            self._webhook(run, WebhookEventType.START)
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
            self._store_image(run, index, image)

        self.metrics.busy.set(1)
        try:
            self.pipeline.generate(rows, width, height, on_step=on_step, on_image=on_image)
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
            error = exc.to_dict() if isinstance(exc, LdmServeError) else {"type": "internal_error", "message": str(exc)}
            for run in open_runs:
                self._close(run, JobStatus.FAILED, error=error)
            return
        finally:
            self.metrics.busy.set(0)
        for run in runs:
            if not run.closed:  # rows dropped without a recorded reason: never leave a job running
                self._close(run, JobStatus.FAILED, error={"type": "internal_error", "message": "no image produced"})

    def _on_step(self, progress: list[Any], owner: list[tuple[JobRun, int]]) -> list[int]:
        """Write progress, then return the rows of jobs that were canceled or ran out of time."""
        per_job: dict[str, tuple[JobRun, int, int]] = {}
        for p in progress:
            run, _ = owner[p.row]
            if not run.closed and run.job_id not in per_job:
                per_job[run.job_id] = (run, p.step, p.total)
        return [row for run in self._progress_and_stops(per_job) for row in run.row_index]

    def _progress_and_stops(
        self, per_job: dict[str, tuple[JobRun, int, int]], extra: dict[str, dict[str, Any]] | None = None
    ) -> list[JobRun]:
        """Write each job's progress (and ``extra`` hash fields), read the cancel flags, enforce
        ``job_timeout_s``; close and return the jobs that must stop. One Redis round trip."""
        if not per_job:
            return []
        ids = list(per_job)
        keys = self.store.keys
        pipe = self.store.redis.pipeline(transaction=False)  # one round trip per step for all jobs
        for job_id in ids:
            run, step, total = per_job[job_id]
            run.last_step = step
            pipe.hset(keys.job(job_id), mapping={"step": step, "total": total})
            pipe.xadd(keys.events(job_id), {"type": EventType.PROGRESS.value,
                                            "data": _json({"step": step, "total": total})}, maxlen=2000)
            if extra and job_id in extra:
                pipe.hset(keys.job(job_id), mapping=extra[job_id])
        pipe.mget([keys.cancel(j) for j in ids])
        flags = pipe.execute()[-1]
        drop: list[JobRun] = []
        now = time.time()
        for job_id, flag in zip(ids, flags, strict=True):
            run = per_job[job_id][0]
            if flag is not None:
                self._close(run, JobStatus.CANCELED)
            elif now - run.started > self.settings.job_timeout_s:
                self._close(run, JobStatus.FAILED, error={
                    "type": "timeout", "message": f"ran longer than job_timeout_s={self.settings.job_timeout_s}"})
            else:
                self._webhook(run, WebhookEventType.PROGRESS)
                continue
            drop.append(run)
        return drop

    def _store_image(self, run: JobRun, index: int, image: Any) -> None:
        if run.closed:
            return
        p = run.payload
        total = self.pipeline.step_count(p.steps)
        if run.last_step < total:  # a row can be decoded before the step callback reports its last step
            run.last_step = total
            self.store.redis.hset(self.store.keys.job(p.job_id), mapping={"step": total, "total": total})
            self.store.add_event(p.job_id, EventType.PROGRESS, {"step": total, "total": total})
        data = encode_image(image, OutputFormat(p.output_format), p.quality)
        lifetime = self.settings.result_ttl_s + self.settings.job_timeout_s
        self.results.put_image(p.job_id, index, data, lifetime)
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.hset(self.store.keys.job(p.job_id), f"image:{index}", 1)
        pipe.execute()
        self.store.add_event(p.job_id, EventType.IMAGE, {"index": index})
        self.metrics.images.labels(self.model).inc()
        run.images_done += 1
        if run.images_done == p.n:
            self._close(run, JobStatus.SUCCEEDED)

    # ------------------------------------------------------------------ finishing
    def _close(self, run: JobRun, status: JobStatus, error: dict[str, Any] | None = None) -> None:
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
        self._webhook(run, WebhookEventType.COMPLETED)

    def _webhook(self, run: JobRun, event: WebhookEventType) -> None:
        try:
            self.webhooks.emit(run.payload, event)
        except Exception:  # noqa: BLE001 - a webhook problem never fails the job
            log.warning("could not enqueue %s webhook for job %s", event.value, run.job_id, exc_info=True)


def _prompt_warnings(pipeline: Any, row: Any) -> list[str]:
    """The pipeline's notes on a row's prompts (truncation); none from pipelines without the hook."""
    hook = getattr(pipeline, "prompt_warnings", None)
    return list(hook(row)) if hook is not None else []


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)
