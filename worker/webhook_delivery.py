"""Running webhook deliveries in a thread of the worker process.

Deliveries are short HTTP calls on their own RQ queue (``{prefix}-webhooks``);
``ldm_serve.webhooks.runner.WebhookWorker`` drains that queue and moves due retries
out of RQ's schedule, without forking and without touching signal handlers, so
it can share the generation worker's process. Real deployments may instead run
``rq worker -w worker.webhook_delivery.ConfiguredWebhookWorker --with-scheduler
--serializer rq.serializers.JSONSerializer ldm-webhooks`` (with ``LDM_RUN_WEBHOOK_WORKER=false``
on the generation workers).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq import SimpleWorker

from ldm_serve.contract import webhook_queue_name
from ldm_serve.jobstore import connect
from ldm_serve.settings import Settings

log = logging.getLogger(__name__)


class DeliveryThread:
    """Handle on the running delivery thread."""

    def __init__(self, stop: threading.Event, thread: threading.Thread) -> None:
        self._stop = stop
        self.thread = thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the current delivery and wait for the thread."""
        self._stop.set()
        self.thread.join(timeout_s)


def configure(settings: Settings) -> None:
    """Give the delivery code this process's secret and URL policy (never via job kwargs)."""
    from ldm_serve.webhooks import DeliveryConfig, configure_delivery

    configure_delivery(
        DeliveryConfig(
            secret=settings.webhook_secret,
            allow_private=settings.allow_private_webhooks,
            timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts,
            base_delay_s=settings.webhook_retry_base_s,
            record_ttl_s=settings.result_ttl_s,
        )
    )


class ConfiguredWebhookWorker(SimpleWorker):
    """A plain ``rq worker`` class for the delivery queue: configures the signing secret first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        configure(Settings())
        super().__init__(*args, **kwargs)


def start_delivery_thread(settings: Settings) -> DeliveryThread:
    """Start delivering webhooks in a daemon thread."""
    from ldm_serve.webhooks import WEBHOOK_DELIVERIES, WebhookWorker

    configure(settings)
    for result in ("delivered", "retrying", "gave_up", "refused"):  # exported at 0: alerts see the first one
        WEBHOOK_DELIVERIES.labels(result)
    # its own client (pool) with the service's timeouts: never shared with the generation loop
    conn = connect(settings)
    stop = threading.Event()
    runner = WebhookWorker(conn, queue_name=webhook_queue_name(settings.redis_prefix), poll_s=0.25)
    thread = threading.Thread(target=runner.run, args=(stop,), name="webhook-delivery", daemon=True)
    thread.start()
    log.info("webhook delivery thread started on queue %s", webhook_queue_name(settings.redis_prefix))
    return DeliveryThread(stop, thread)
