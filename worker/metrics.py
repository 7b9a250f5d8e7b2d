"""Prometheus metrics of a worker process (served on ``worker_metrics_port``).

Names follow the Prometheus conventions: ``ldm_`` prefix, base units in the
name, ``_total`` counters, and only bounded labels (model, status, result).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# x2 geometric buckets from 5 ms to ~20 min: covers a CPU step and a long queue wait.
SECONDS_BUCKETS = tuple(0.005 * 2**i for i in range(19))
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class WorkerMetrics:
    """Every metric a worker updates, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs_finished = Counter(
            "ldm_jobs_finished_total", "Jobs finished by this worker, by final status", ["model", "status"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ldm_job_queue_wait_seconds", "Time from submission to start", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.run_time = Histogram(
            "ldm_job_run_seconds", "Time from start to the job's last image", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "ldm_job_e2e_seconds", "Time from submission to the job's last image", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.batch_rows = Histogram(
            "ldm_batch_size_rows", "Rows (images) per batched DDIM run", ["model"],
            buckets=ROW_BUCKETS, registry=registry,
        )
        self.batch_jobs = Histogram(
            "ldm_batch_size_jobs", "Jobs per batched DDIM run", ["model"],
            buckets=ROW_BUCKETS, registry=registry,
        )
        self.step_seconds = Histogram(
            "ldm_denoise_step_seconds", "Wall time of one batched DDIM step", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.decode_seconds = Histogram(
            "ldm_decode_seconds", "Time from a row's last DDIM step to its decoded image", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.images = Counter(
            "ldm_images_generated_total", "Images generated and stored", ["model"], registry=registry
        )
        # continuous batching (ldm.engine): one observation per engine step
        self.engine_running_rows = Gauge(
            "ldm_engine_running_rows", "Rows in the engine's running batch", ["model"], registry=registry
        )
        self.engine_waiting_rows = Gauge(
            "ldm_engine_waiting_rows", "Rows taken by the worker, waiting to join the running batch", ["model"],
            registry=registry,
        )
        self.engine_admitted_rows = Counter(
            "ldm_engine_admitted_rows_total", "Rows admitted into the running batch", ["model"], registry=registry
        )
        self.engine_padded_rows = Counter(
            "ldm_engine_padded_rows_total", "Padding rows added to UNet batches to reach a bucket size", ["model"],
            registry=registry,
        )
        self.engine_step_seconds = Histogram(
            "ldm_engine_step_seconds", "Wall time of one engine step (admission, denoising, decoding)", ["model"],
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.engine_failed_groups = Counter(
            "ldm_engine_failed_jobs_total", "Jobs dropped by the engine because they failed alone", ["model"],
            registry=registry,
        )
        self.queue_to_first_step = Histogram(
            "ldm_queue_to_first_step_seconds", "Time from submission until the job's first denoising step starts",
            ["model"], buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.busy = Gauge("ldm_worker_busy", "1 while the worker runs a batch", registry=registry)
        self.up = Gauge("ldm_worker_up", "1 while the worker takes jobs", registry=registry)
        self.webhooks_enqueued = Counter(
            "ldm_webhook_events_enqueued_total", "Webhook events put on the delivery queue", ["event"],
            registry=registry,
        )

    def init_model(self, model: str) -> None:
        """Create the per-model counters at 0, so that they are exported (and rate() sees their first
        increase) before the first job: a series that appears only with its first event hides that event."""
        for status in ("succeeded", "failed", "canceled", "expired"):
            self.jobs_finished.labels(model, status)
        for counter in (self.images, self.engine_admitted_rows, self.engine_padded_rows, self.engine_failed_groups):
            counter.labels(model)

    def export_backend_padding(self, pipeline: Any) -> bool:
        """Count the rows a bucketed backend pads (cudagraphs, tensorrt) in ``ldm_engine_padded_rows_total``.

        Those backends pad inside the compiled UNet / decoder, below the engine, and
        count into the :class:`~ldm.backends.base.PaddedRowCounter` of the compiled
        UNet; this subscribes the Prometheus counter to it. Returns False when the
        pipeline's UNet pads nothing (eager, torchscript, inductor).
        """
        unet = getattr(getattr(pipeline, "model", None), "unet", None)
        counter = getattr(unet, "padded_rows", None)
        if counter is None or not hasattr(counter, "subscribe"):
            return False
        child = self.engine_padded_rows.labels(pipeline.name)
        counter.subscribe(lambda rows: child.inc(rows))
        return True
