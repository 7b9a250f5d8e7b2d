"""The long-lived, non-forking generation worker.

One process loads its model once, warms it up, registers itself (with a
heartbeat) and then loops. With ``batching="continuous"`` (the default) every
iteration takes the compatible queued jobs there is room for into the running
batch and advances it by one DDIM step (:mod:`worker.continuous`); with
``batching="request"`` it pops the next job, gathers compatible queued jobs for a
short window and runs them as one batch from start to finish. Jobs are never
handed to a forked child (CUDA state cannot cross ``fork()``, and the weights
would reload).

SIGTERM / SIGINT: stop taking work, finish the running batch, deregister, exit.
A worker that dies without deregistering is detected by its expired heartbeat;
any worker (or the gateway) then re-queues its jobs via
:meth:`ldm_serve.jobstore.JobStore.recover_dead_workers`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from ldm_serve.contract import ModelConstraints, WorkerInfo
from ldm_serve.errors import QueueUnavailable
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.model_limits import model_constraints
from ldm_serve.results import RedisResultStore
from ldm_serve.settings import Settings
from worker.batching import BatchCollector
from worker.continuous import ContinuousRunner
from worker.jobs import JobBook
from worker.metrics import WorkerMetrics
from worker.probes import ProbeServer
from worker.runner import BatchRunner
from worker.webhook_events import WebhookEmitter

log = logging.getLogger("ldm_serve.worker")


def load_model(settings: Settings, cache_dir: Path | None = None) -> Any:
    """Load ``settings.model_path``; without one, the bundled model, else (not installed) the tiny untrained one."""
    from ldm_serve.cpu_threads import quiet_openmp_for_core_workers

    quiet_openmp_for_core_workers(settings.device, settings.core_workers)  # before torch loads
    from ldm.pipeline import load_pipeline
    from worker.default_model import default_model

    path = settings.model_path or default_model(cache_dir).path
    import torch

    pipeline = load_pipeline(
        path,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        batch_invariant=settings.batch_invariant,
        core_workers=settings.core_workers,
    )
    pipeline.truncate_long_prompts = True  # the service runs them truncated, with a warning on the job
    from ldm.backends import apply_backend, resolve_backend

    backend = resolve_backend(settings.backend, pipeline.device)
    if backend != "eager":
        from ldm_serve.models import cache_dir as default_cache_dir

        try:
            report = apply_backend(
                pipeline,
                backend,
                cache_dir=settings.compile_cache_dir or default_cache_dir() / "compiled",
                buckets=settings.batch_buckets,
            )
        except Exception as exc:  # noqa: BLE001 - only the automatic choice falls back
            if settings.backend != "auto":
                raise
            log.warning("backend auto: %s failed (%s: %s); running eager", backend, type(exc).__name__, exc)
        else:
            log.info("backend %s ready: %s", backend, report.summary())
    if getattr(pipeline, "untrained", False):
        log.warning("=" * 72)
        log.warning("UNTRAINED MODEL %r: images are noise. Pass --model PATH for real output.", pipeline.name)
        log.warning("=" * 72)
    return pipeline


def model_constraints_of(pipeline: Any, settings: Settings) -> ModelConstraints | None:
    """What this worker's model runs, as advertised in its heartbeat (None for a pipeline that does
    not say). Limits a stand-in pipeline does not report are not checked."""
    default_size = getattr(pipeline, "default_size", None)
    if not default_size:
        return None
    multiple = getattr(pipeline, "size_multiple", None) or getattr(pipeline, "downsample_factor", None) or 8
    extra: dict[str, Any] = {}
    config = getattr(pipeline, "config", None)
    if hasattr(pipeline, "refused_step_counts"):
        extra["refused_steps"] = pipeline.refused_step_counts(settings.max_steps)
    if config is not None:
        extra["max_steps"] = int(config.timesteps)
        extra["prediction_type"] = str(config.parameterization)
    for name in ("guidance_range", "job_kinds", "n_classes", "timestep_spacing"):
        if hasattr(pipeline, name):
            extra[{"job_kinds": "kinds"}.get(name, name)] = getattr(pipeline, name)
    if getattr(pipeline, "max_prompt_tokens", None):
        extra["max_prompt_tokens"] = int(pipeline.max_prompt_tokens)
    return model_constraints(int(default_size), int(multiple), settings, **extra)


class Worker:
    """One generation worker bound to one loaded pipeline.

    Args:
        pipeline: the loaded ``LatentDiffusionPipeline``.
        settings: validated settings.
        registry: the Prometheus registry for this worker's metrics.
        row_factory: row type (default ``ldm.pipeline.GenerationRow``).
    """

    def __init__(
        self,
        pipeline: Any,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        row_factory: Any = None,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.store = JobStore(connect(settings), settings)
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self.metrics.init_model(pipeline.name)
        self.metrics.export_backend_padding(pipeline)
        self.webhooks = WebhookEmitter(
            self.store, settings, on_enqueue=lambda ev: self.metrics.webhooks_enqueued.labels(ev).inc()
        )
        results = RedisResultStore(self.store.redis, self.store.keys)
        # one job bookkeeping object, whichever batching mode drives the model
        self.book = JobBook(pipeline, self.store, results, settings, self.metrics, self.webhooks, self.name, row_factory)
        self.runner = BatchRunner(
            pipeline, self.store, results, settings, self.metrics, self.webhooks, self.name, book=self.book
        )
        self.collector = BatchCollector(
            self.store.redis, self.store.keys, self.store.queue_keys(pipeline.name), self.name
        )
        self.continuous: ContinuousRunner | None = None
        if settings.batching == "continuous":
            self.continuous = ContinuousRunner(
                pipeline, self.store, results, settings, self.metrics, self.webhooks, self.name, book=self.book
            )
        self._stop = threading.Event()
        self._halted = threading.Event()  # set when the loop has ended: the heartbeat stops
        self.ready = threading.Event()  # registered and taking jobs (the probe server's /readyz)
        self._last_reap = 0.0
        self._last_batch_jobs = 1

    # ------------------------------------------------------------------ lifecycle
    def info(self) -> WorkerInfo:
        p = self.pipeline
        return WorkerInfo(
            name=self.name,
            model=p.name,
            untrained=bool(getattr(p, "untrained", False)),
            inpaint_mode=getattr(p, "inpaint_mode", None),
            default_size=getattr(p, "default_size", None),
            downsample_factor=getattr(p, "downsample_factor", None),
            max_prompt_tokens=getattr(p, "max_prompt_tokens", None),
            max_batch_rows=self.settings.max_batch_rows,
            constraints=model_constraints_of(p, self.settings),
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
        )

    def warm_up(self) -> None:
        """One tiny generation so the first real batch does not pay for lazy initialisation."""
        size = self.pipeline.default_size  # the most common shape; one step keeps it short
        t0 = time.monotonic()
        self.pipeline.generate([self.runner.row_factory(prompt="warm-up", seed=0, steps=1)], size, size)
        log.info("warm-up done in %.2fs", time.monotonic() - t0)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Stop after the current batch (signal handler)."""
        if not self._stop.is_set():
            log.info("stop requested (%s): finishing the current batch", signum)
        self.ready.clear()
        self._stop.set()

    def _heartbeat_loop(self, info: WorkerInfo) -> None:
        # beats on while a stopping worker drains its running batch, so nobody reaps its jobs
        while not self._halted.wait(self.settings.heartbeat_interval_s):
            try:
                self.store.heartbeat(info)
            except QueueUnavailable:
                log.warning("heartbeat failed: Redis unreachable")

    def _maybe_reap(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < self.settings.reap_interval_s:
            return
        self._last_reap = now
        recovered = self.store.recover_dead_workers()
        if recovered:
            log.warning("recovered %d job(s) of dead workers: %s", len(recovered), recovered)

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        """Register, then take batches until asked to stop."""
        if self.settings.warmup:
            self.warm_up()
        info = self.info()
        self.store.register_worker(info)
        self.metrics.up.set(1)
        if not self._stop.is_set():
            self.ready.set()
        hb = threading.Thread(target=self._heartbeat_loop, args=(info,), name="heartbeat", daemon=True)
        hb.start()
        log.info("worker %s serving model %r (pid %d)", self.name, self.pipeline.name, os.getpid())
        try:
            orphaned = False
            while not self._stop.is_set() or self._draining():
                try:
                    if orphaned:  # Redis came back: our interrupted jobs go back to the queue
                        self.store.register_worker(self.info())
                        recovered = self.store.recover_jobs_of(self.name)
                        log.warning("Redis is back; re-queued %d interrupted job(s)", len(recovered))
                        orphaned = False
                    self._maybe_reap()
                    self._iteration()
                except QueueUnavailable as exc:
                    log.warning("%s; retrying in 1s", exc)
                    orphaned = True
                    if self.continuous is not None:
                        self.continuous.reset()  # their outcome can't be recorded; recovery re-queues them
                    if self._stop.wait(1.0):
                        break
        finally:
            self.ready.clear()
            self.metrics.up.set(0)
            self._stop.set()
            self._halted.set()
            hb.join(5)  # so that no heartbeat re-registers us after deregistration
            try:
                self.store.deregister_worker(self.name)
            except QueueUnavailable:
                log.warning("could not deregister: Redis unreachable")
            log.info("worker %s stopped", self.name)

    def _draining(self) -> bool:
        """Stopping, but the continuous batch still holds jobs to finish."""
        return self.continuous is not None and not self.continuous.idle

    def _iteration(self) -> None:
        if self.continuous is not None:
            self._continuous_step()
        else:
            self._one_batch()

    def _continuous_step(self) -> None:
        """Take the compatible queued jobs there is room for, then advance the running batch one step."""
        runner = self.continuous
        assert runner is not None
        if runner.idle:
            if self._stop.is_set():
                return
            first = self.collector.pop_next(timeout_s=1)
            if first is None:
                return
            rec = self._record_of(first)
            if rec is None:
                return
            rows_left = self.settings.max_batch_rows - int(rec.get("rows", 1))
            more = self.collector.gather(rec["bkey"], rows_left, 0.0, linger=False, in_order=True)
            runner.admit([first, *more], rec["bkey"])
        elif not self._stop.is_set() and runner.batch_key is not None and runner.room() > 0:
            taken = self.collector.gather(runner.batch_key, runner.room(), 0.0, linger=False, in_order=True)
            if taken:
                runner.admit(taken, runner.batch_key)
        runner.step()

    def _record_of(self, job_id: str) -> dict[str, str] | None:
        try:
            return self.store.get(job_id)
        except QueueUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a popped id without a record is dropped
            log.warning("popped job %s has no record; dropped", job_id)
            self.store.release(self.name, job_id)
            return None

    def _one_batch(self) -> None:
        first = self.collector.pop_next(timeout_s=1)
        if first is None:
            return
        try:
            rec = self.store.get(first)
        except Exception:  # noqa: BLE001 - a popped id without a record is dropped
            log.warning("popped job %s has no record; dropped", first)
            self.store.release(self.name, first)
            return
        rows_left = self.settings.max_batch_rows - int(rec.get("rows", 1))
        # Wait for batch-mates when the last batch had company (load) or some are already queued.
        more = self.collector.gather(
            rec["bkey"], rows_left, self.settings.batch_window_ms / 1000, linger=self._last_batch_jobs > 1
        )
        self._last_batch_jobs = 1 + len(more)
        self.runner.run([first, *more])


def run_worker(settings: Settings, *, cache_dir: Path | None = None) -> None:
    """Entry point of ``ldm-serve worker``: load, serve metrics, loop until SIGTERM."""
    registry = REGISTRY  # shared with the webhook delivery metrics of ldm_serve.webhooks
    worker: Worker | None = None
    if settings.worker_metrics_port is not None:  # up during the model load: /readyz says 503 until ready
        ProbeServer(
            registry, lambda: worker is not None and worker.ready.is_set(), settings.host,
            settings.worker_metrics_port,
        ).start()
    pipeline = load_model(settings, cache_dir)
    from worker.gpu_metrics import register_gpu_metrics

    if register_gpu_metrics(registry, pipeline.device):
        log.info("exporting GPU metrics of %s", pipeline.device)
    worker = Worker(pipeline, settings, registry)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    delivery = None
    if settings.run_webhook_worker:
        from worker.webhook_delivery import start_delivery_thread

        delivery = start_delivery_thread(settings)
    try:
        worker.run()
    finally:
        if delivery is not None:
            delivery.stop()
