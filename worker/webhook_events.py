"""Turning job transitions into webhook deliveries on their own RQ queue.

The worker never makes HTTP calls itself: it builds the Standard-Webhooks event
envelope (with ``ldm_serve.webhooks.events.WebhookEvent``, the one builder) and enqueues one
delivery job per event on ``{prefix}-webhooks``; the delivery function
(``ldm_serve.webhooks.delivery``) signs, posts and retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ldm_serve.contract import GenerationPayload, WebhookEventType, webhook_queue_name
from ldm_serve.jobstore import JobStore
from ldm_serve.jobview import job_view
from ldm_serve.settings import Settings
from ldm_serve.signed_urls import url_signer

log = logging.getLogger(__name__)


def event_type(event: WebhookEventType, status: str) -> str:
    """Standard-Webhooks event type: ``job.started``, ``job.progress`` or ``job.<terminal status>``."""
    if event is WebhookEventType.START:
        return "job.started"
    if event is WebhookEventType.PROGRESS:
        return "job.progress"
    return f"job.{status}"


class WebhookEmitter:
    """Enqueues webhook events for jobs that asked for them.

    Progress events are throttled to one per ``webhook_progress_interval_s`` per job.
    """

    def __init__(self, store: JobStore, settings: Settings, on_enqueue: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.queue_name = webhook_queue_name(settings.redis_prefix)
        self._last_progress: dict[str, float] = {}
        self._on_enqueue = on_enqueue
        self._signer = url_signer(settings)  # signed absolute result URLs when public_base_url is set

    def emit(self, payload: GenerationPayload, event: WebhookEventType) -> bool:
        """Enqueue ``event`` for the job if its webhook filter includes it. Returns whether it did."""
        from ldm_serve.webhooks.events import WebhookEvent

        hook = payload.webhook
        if hook is None or event not in hook.events:
            return False
        if event is WebhookEventType.PROGRESS:
            now = time.monotonic()
            last = self._last_progress.get(payload.job_id)
            if last is not None and now - last < self.settings.webhook_progress_interval_s:
                return False
            self._last_progress[payload.job_id] = now
        if event is WebhookEventType.COMPLETED:
            self._last_progress.pop(payload.job_id, None)
        rec = self.store.get(payload.job_id)
        body = WebhookEvent(event_type(event, rec["status"]), job_view(rec, signer=self._signer))
        self.store.enqueue_webhook(payload.job_id, hook.url, body, self.queue_name)
        if self._on_enqueue is not None:
            self._on_enqueue(event.value)
        return True
