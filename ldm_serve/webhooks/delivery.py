"""Webhook delivery as an RQ job: one signed attempt, recorded, retried with backoff.

``deliver_webhook`` makes one delivery attempt. A failed attempt records itself (in the job's
``Keys.webhook_attempts`` list) and re-enqueues the job with ``Queue.enqueue_at`` (exponential
backoff), which needs an RQ scheduler: either :class:`ldm_serve.webhooks.runner.WebhookWorker`
or ``rq worker --with-scheduler``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter, Histogram
from redis import Redis
from rq import Queue, get_current_job
from rq.serializers import JSONSerializer

from ldm_serve.contract import Keys, webhook_queue_name
from ldm_serve.errors import InvalidInput
from ldm_serve.webhooks.events import WebhookEvent, encode_event, utc_now_iso
from ldm_serve.webhooks.signing import Secrets, as_secret_list, build_headers, secret_key_bytes
from ldm_serve.webhooks.targets import WebhookTarget, check_webhook_target

DEFAULT_QUEUE = webhook_queue_name(Keys().prefix)  # "ldm-webhooks"; the worker uses its own prefix's
# RQ records this dotted path; ``ldm_serve.webhooks.deliver_webhook`` (the name before the split,
# still re-exported by the package) resolves to the same function for jobs queued by older code.
DELIVER_FUNC = "ldm_serve.webhooks.delivery.deliver_webhook"
_USER_AGENT = "ldm-serve-webhooks/1"

WEBHOOK_DELIVERIES = Counter(
    "ldm_webhook_deliveries",
    "Webhook delivery attempts by result (delivered, retrying, gave_up, refused).",
    ["result"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "ldm_webhook_delivery_seconds",
    "Duration of webhook HTTP attempts.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@dataclass(frozen=True)
class DeliveryConfig:
    """Process-wide delivery settings (the secret stays in the process, never in Redis).

    Attributes:
        secret: ``whsec_`` secret, or several (each signs; receivers accept any: key rotation).
        allow_private: allow private / loopback / link-local targets (development only).
        timeout_s: HTTP timeout of one attempt.
        max_attempts: attempts per event, the first included (``job.progress`` gets one).
        base_delay_s: delay after the first failure; doubles each time, +-``jitter``, capped at
            ``max_delay_s``; a ``Retry-After`` response header lengthens it.
        record_ttl_s: TTL of the attempt list (set it to the job record's TTL).
        max_records: the attempt list keeps only the newest entries.
        job_timeout_s: RQ ``job_timeout`` of a delivery job.
    """

    secret: Secrets | None = None
    allow_private: bool = False
    timeout_s: float = 10.0
    max_attempts: int = 8
    base_delay_s: float = 5.0
    max_delay_s: float = 3600.0
    jitter: float = 0.1
    record_ttl_s: int = 86400
    max_records: int = 100
    job_timeout_s: int = 60


_config = DeliveryConfig()
_config_lock = threading.Lock()


def configure_delivery(config: DeliveryConfig) -> None:
    """Set this process's delivery settings; call once before running delivery jobs."""
    global _config
    if config.secret is not None:
        for s in as_secret_list(config.secret):
            secret_key_bytes(s)  # fail at start-up, not at the first delivery
    with _config_lock:
        _config = config


def get_delivery_config() -> DeliveryConfig:
    """This process's delivery settings (defaults until ``configure_delivery`` is called)."""
    return _config


def backoff_delay(
    failed_attempt: int,
    config: DeliveryConfig,
    *,
    retry_after_s: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed.

    ``base_delay_s * 2**(failed_attempt-1)`` with +-``jitter`` relative jitter, at most
    ``max_delay_s``; never shorter than a (capped) ``Retry-After``.
    """
    delay = config.base_delay_s * 2 ** (failed_attempt - 1)
    delay *= 1.0 + config.jitter * (2.0 * rng() - 1.0)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return max(0.0, min(delay, config.max_delay_s))


@dataclass(frozen=True)
class AttemptOutcome:
    """What one HTTP attempt gave: a status code, or an error string."""

    status_code: int | None
    error: str | None
    duration_s: float
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One TLS context (httpx's defaults, certifi's CAs) for every delivery: building one parses the
    whole CA bundle, about 0.2 s of CPU per delivery on a busy machine."""
    return httpx.create_ssl_context()


def post_signed(
    target: WebhookTarget,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    transport: httpx.BaseTransport | None = None,
) -> AttemptOutcome:
    """POST ``body`` to a checked target once; never raises for network or HTTP failures.

    A named host with checked ``addresses`` is reached at ``addresses[0]`` (``Host`` header and TLS
    SNI/certificate name stay the hostname), so a DNS answer that changes after the check cannot
    redirect the request. Redirects are not followed; proxies from the environment are ignored.
    """
    url, send_headers, extensions = target.url, dict(headers), {}
    if target.addresses:
        ip = target.addresses[0].split("%", 1)[0]
        ip_host = f"[{ip}]" if ":" in ip else ip
        parts = urlsplit(target.url)
        explicit_port = f":{parts.port}" if parts.port is not None else ""
        url = urlunsplit((parts.scheme, ip_host + explicit_port, parts.path, parts.query, ""))
        send_headers["host"] = target.host + explicit_port
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
    send_headers.setdefault("user-agent", _USER_AGENT)
    start = time.perf_counter()
    try:
        with httpx.Client(
            timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport, verify=_tls_context()
        ) as client:
            with client.stream(
                "POST", url, content=body, headers=send_headers, extensions=extensions
            ) as response:
                status, retry_after = response.status_code, _retry_after(response.headers.get("retry-after"))
    except httpx.TimeoutException:
        return AttemptOutcome(None, f"timeout after {timeout_s:g} s", time.perf_counter() - start)
    except httpx.HTTPError as exc:
        return AttemptOutcome(None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return AttemptOutcome(status, None, time.perf_counter() - start, retry_after)


def _record(
    connection: Redis | None, key: str, entry: dict[str, Any], config: DeliveryConfig, ttl: int
) -> None:
    WEBHOOK_DELIVERIES.labels(result=entry["result"]).inc()
    if connection is None:
        return
    with connection.pipeline() as pipe:
        pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
        pipe.ltrim(key, -config.max_records, -1)
        pipe.expire(key, ttl)
        pipe.execute()


def deliver_webhook(
    *,
    url: str,
    event: dict[str, Any],
    webhook_id: str,
    job_id: str,
    attempt: int = 1,
    secret: Secrets | None = None,
    record_key: str | None = None,
    record_ttl_s: int | None = None,
) -> dict[str, Any]:
    """Deliver one webhook attempt; meant to run as an RQ job (JSON-serialisable kwargs only).

    Re-checks the URL (DNS rebinding), POSTs ``event`` signed with a fresh ``webhook-timestamp``
    (``webhook-id`` is stable across attempts), appends the attempt to the Redis list
    ``record_key`` (default ``Keys().webhook_attempts(job_id)``, the default prefix) and counts it in
    ``ldm_webhook_deliveries_total{result}``. After a failure (non-2xx other than 410, timeout,
    connection error) it enqueues itself again on its own queue with ``enqueue_at(now + backoff)``,
    until ``max_attempts``; ``job.progress`` events are attempted once.

    Returns:
        The attempt record: ``event_type, webhook_id, attempt, at, status_code, error,
        duration_ms, result`` (``delivered | retrying | gave_up | refused``) and, when retrying,
        ``next_attempt_at``.
    """
    config = get_delivery_config()
    signing = secret if secret is not None else config.secret
    if not signing:
        raise RuntimeError("no webhook signing secret: call ldm_serve.webhooks.configure_delivery() first")
    rq_job = get_current_job()
    connection = rq_job.connection if rq_job is not None else None
    key = record_key or Keys().webhook_attempts(job_id)
    ttl = int(record_ttl_s if record_ttl_s is not None else config.record_ttl_s)
    event_type = str(event.get("type", ""))
    entry: dict[str, Any] = {
        "event_type": event_type,
        "webhook_id": webhook_id,
        "attempt": attempt,
        "at": utc_now_iso(),
        "status_code": None,
        "error": None,
        "duration_ms": 0.0,
    }

    try:
        target = check_webhook_target(url, allow_private=config.allow_private)
    except InvalidInput as exc:
        entry.update(result="refused", error=str(exc))
        _record(connection, key, entry, config, ttl)
        return entry

    body = encode_event(event)
    headers = build_headers(signing, webhook_id, int(time.time()), body)
    outcome = post_signed(target, body, headers, timeout_s=config.timeout_s)
    WEBHOOK_DELIVERY_SECONDS.observe(outcome.duration_s)
    entry.update(
        status_code=outcome.status_code, error=outcome.error, duration_ms=round(outcome.duration_s * 1e3, 1)
    )
    if outcome.status_code is not None and not outcome.ok:
        entry["error"] = f"HTTP {outcome.status_code}"

    can_retry = (
        not outcome.ok
        and outcome.status_code != 410  # Gone: the receiver asks us to stop
        and event_type != "job.progress"
        and attempt < config.max_attempts
        and rq_job is not None
    )
    if outcome.ok:
        entry["result"] = "delivered"
    elif can_retry:
        delay = backoff_delay(attempt, config, retry_after_s=outcome.retry_after_s)
        # RQ's scheduler keeps whole seconds (truncated): round up so the wait is never shorter
        due = datetime.fromtimestamp(math.ceil(time.time() + delay), tz=timezone.utc)
        queue = Queue(rq_job.origin, connection=connection, serializer=rq_job.serializer)
        queue.enqueue_at(
            due,
            DELIVER_FUNC,
            kwargs={
                "url": url,
                "event": event,
                "webhook_id": webhook_id,
                "job_id": job_id,
                "attempt": attempt + 1,
                "secret": secret,
                "record_key": record_key,
                "record_ttl_s": record_ttl_s,
            },
            job_timeout=config.job_timeout_s,
            result_ttl=ttl,
            failure_ttl=ttl,
        )
        entry.update(
            result="retrying", next_attempt_at=due.isoformat(timespec="seconds").replace("+00:00", "Z")
        )
    else:
        entry["result"] = "gave_up"
    _record(connection, key, entry, config, ttl)
    return entry


def new_webhook_id() -> str:
    """A fresh ``webhook-id`` (``msg_<32 hex>``), stable across the retries of one event."""
    return f"msg_{uuid.uuid4().hex}"


def enqueue_webhook(
    connection: Redis,
    *,
    job_id: str,
    url: str,
    event: WebhookEvent | Mapping[str, Any],
    queue_name: str = DEFAULT_QUEUE,
    record_key: str | None = None,
    record_ttl_s: int | None = None,
    webhook_id: str | None = None,
) -> str:
    """Enqueue the first delivery attempt of ``event`` on ``queue_name``; return its ``webhook-id``."""
    config = get_delivery_config()
    ttl = int(record_ttl_s if record_ttl_s is not None else config.record_ttl_s)
    msg_id = webhook_id or new_webhook_id()
    payload = event.to_dict() if isinstance(event, WebhookEvent) else dict(event)
    Queue(queue_name, connection=connection, serializer=JSONSerializer).enqueue_call(
        func=DELIVER_FUNC,
        kwargs={
            "url": url,
            "event": payload,
            "webhook_id": msg_id,
            "job_id": job_id,
            "record_key": record_key,
            "record_ttl_s": record_ttl_s,
        },
        timeout=config.job_timeout_s,
        result_ttl=ttl,
        failure_ttl=ttl,
    )
    return msg_id
