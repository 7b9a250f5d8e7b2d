"""A webhook delivery worker that is safe to run in a thread (no fork, no signals, no pubsub)."""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from ldm_serve.webhooks.delivery import DEFAULT_QUEUE

log = logging.getLogger(__name__)


class _DeliveryWorker(SimpleWorker):
    """``SimpleWorker`` for short burst ticks in any thread.

    * No signal handlers (only the main thread may install them); ``job_timeout`` is enforced by
      a timer thread instead of SIGALRM.
    * No pubsub subscription. RQ's worker subscribes to its command channel in a helper thread on
      every ``work()`` and joins that thread on teardown; when the helper has already read the
      UNSUBSCRIBE reply before the join (the delivery thread was descheduled in between, which is
      common on a busy machine), it sits in its 60 s poll and every delivery waits a minute
      (issue 10). Burst ticks last milliseconds and need none of RQ's remote commands.
    * The connection keeps its own socket timeout: RQ raises it to ``dequeue_timeout + 10`` s for
      blocking dequeues, which burst mode never does, and a short one bounds a hung Redis.
    """

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass

    def _set_connection(self, connection: Redis) -> Redis:
        return connection

    def subscribe(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass


class WebhookWorker:
    """Runs delivery jobs of one queue, including the delayed retries, without forking.

    Each tick does what ``rq worker --with-scheduler --burst`` does: under RQ's scheduler lock for
    the queue, move the retries that are due from the ``ScheduledJobRegistry`` into the queue, then
    drain the queue with one ``SimpleWorker`` (JSON serializer, no pubsub thread, kept across ticks).
    Several ``WebhookWorker`` processes may share a queue. Stopping is cooperative
    (``threading.Event``), so ``run`` works in a thread.
    """

    def __init__(self, connection: Redis, queue_name: str = DEFAULT_QUEUE, *, poll_s: float = 0.5) -> None:
        self.connection = connection
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self.poll_s = poll_s
        self._worker: _DeliveryWorker | None = None

    def enqueue_due_retries(self) -> None:
        """Move scheduled delivery jobs whose time has come into the queue."""
        registry = ScheduledJobRegistry(queue=self.queue)
        if not registry.get_jobs_to_schedule(int(time.time())):
            return
        scheduler = RQScheduler([self.queue.name], connection=self.connection, serializer=JSONSerializer)
        if scheduler.acquire_locks():
            try:
                scheduler.enqueue_scheduled_jobs()
            finally:
                scheduler.release_locks()

    def run_once(self) -> bool:
        """One tick: enqueue due retries, then run every queued delivery. True if any ran."""
        self.enqueue_due_retries()
        if not self.queue.count:
            return False
        if self._worker is None:
            self._worker = _DeliveryWorker([self.queue], connection=self.connection, serializer=JSONSerializer)
        try:
            return self._worker.work(burst=True, logging_level="WARNING")
        except Exception:
            # e.g. its death was not recorded (Redis hiccup): RQ would refuse its next birth
            self._worker = None
            raise

    def run(self, stop: threading.Event) -> None:
        """Tick every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # a Redis hiccup must not kill the delivery thread
                log.exception("webhook worker tick failed")
            stop.wait(self.poll_s)
