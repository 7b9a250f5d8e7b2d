"""Signed webhooks: Standard Webhooks signatures, SSRF-safe targets, RQ delivery with retries.

Torch-free and FastAPI-free: the gateway imports the target rules, the worker the event builder
and the delivery queue. One job per module:

* :mod:`~ldm_serve.webhooks.signing`: ``whsec_`` secrets, ``sign`` / ``verify`` (https://www.standardwebhooks.com)
* :mod:`~ldm_serve.webhooks.targets`: URL rules (public http(s) hosts only, unless allowed), checked at
  submission and again at delivery
* :mod:`~ldm_serve.webhooks.events`: the envelope ``{"type", "timestamp", "data"}`` (``WebhookEvent``: the
  one builder) and its signed bytes
* :mod:`~ldm_serve.webhooks.delivery`: ``enqueue_webhook`` and the RQ job ``deliver_webhook`` (one attempt,
  recorded in the job's ``Keys.webhook_attempts`` list, retried with backoff)
* :mod:`~ldm_serve.webhooks.runner`: ``WebhookWorker``, a thread-safe loop that runs the scheduler's work and
  drains the delivery queue

The names below are re-exported for callers (and for RQ jobs queued under the old
``ldm_serve.webhooks.deliver_webhook`` path).
"""

from ldm_serve.webhooks.delivery import (
    DEFAULT_QUEUE,
    DELIVER_FUNC,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERY_SECONDS,
    AttemptOutcome,
    DeliveryConfig,
    backoff_delay,
    configure_delivery,
    deliver_webhook,
    enqueue_webhook,
    get_delivery_config,
    new_webhook_id,
    post_signed,
)
from ldm_serve.webhooks.events import (
    EVENT_TYPES,
    TERMINAL_EVENT_TYPES,
    WebhookEvent,
    encode_event,
    event_selected,
    utc_now_iso,
)
from ldm_serve.webhooks.runner import WebhookWorker
from ldm_serve.webhooks.signing import (
    DEFAULT_TOLERANCE_S,
    SECRET_PREFIX,
    SIGNATURE_VERSION,
    build_headers,
    generate_secret,
    sign,
    signature_header,
    verify,
)
from ldm_serve.webhooks.targets import (
    MAX_URL_LENGTH,
    URL_FIELD,
    WebhookTarget,
    address_problem,
    check_webhook_target,
    system_resolver,
    validate_webhook_url,
)

__all__ = [
    "DEFAULT_QUEUE", "DEFAULT_TOLERANCE_S", "DELIVER_FUNC", "EVENT_TYPES", "MAX_URL_LENGTH", "SECRET_PREFIX",
    "SIGNATURE_VERSION", "TERMINAL_EVENT_TYPES", "URL_FIELD", "WEBHOOK_DELIVERIES", "WEBHOOK_DELIVERY_SECONDS",
    "AttemptOutcome", "DeliveryConfig", "WebhookEvent", "WebhookTarget", "WebhookWorker", "address_problem",
    "backoff_delay", "build_headers", "check_webhook_target", "configure_delivery", "deliver_webhook",
    "encode_event", "enqueue_webhook", "event_selected", "generate_secret", "get_delivery_config",
    "new_webhook_id", "post_signed", "sign", "signature_header", "system_resolver", "utc_now_iso",
    "validate_webhook_url", "verify",
]
