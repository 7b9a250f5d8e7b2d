"""Signed webhook delivery: Standard Webhooks signatures, SSRF-safe targets, RQ jobs with retries.

Torch-free and FastAPI-free: the gateway imports the URL rules, the worker the delivery job.

Sections:

1. Signing and verification (https://www.standardwebhooks.com): a ``whsec_<base64 key>`` secret,
   ``webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>``; several
   space-separated signatures allow key rotation.
2. Target rules: ``validate_webhook_url`` refuses anything but public http(s) hosts unless private
   targets are allowed; delivery re-checks and connects to the address it checked (DNS rebinding).
3. The event envelope ``{"type", "timestamp", "data"}``.
4. ``deliver_webhook``: one delivery attempt as an RQ job. A failed attempt records itself and
   re-enqueues the job with ``Queue.enqueue_at`` (exponential backoff), which needs an RQ scheduler:
   either ``WebhookWorker`` (section 5) or ``rq worker --with-scheduler``.
5. ``WebhookWorker``: a thread-safe loop that does the scheduler's work and drains the queue.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter, Histogram
from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from ldm_serve.errors import InvalidInput, WebhookVerificationError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# 1. Signing and verification
# --------------------------------------------------------------------------------------------------

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
_MIN_KEY_BYTES = 16

Secrets = str | Sequence[str]


def generate_secret(n_bytes: int = 32) -> str:
    """Return a fresh random ``whsec_<base64>`` signing secret of ``n_bytes`` key bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(n_bytes)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_<base64>`` secret."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise InvalidInput("webhook_secret", "must look like 'whsec_<base64 key>'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("webhook_secret", "the part after 'whsec_' is not valid base64") from None
    if len(key) < _MIN_KEY_BYTES:
        raise InvalidInput("webhook_secret", f"the key must be at least {_MIN_KEY_BYTES} bytes")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _as_secret_list(secret: Secrets) -> list[str]:
    return [secret] if isinstance(secret, str) else list(secret)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """Standard Webhooks signature ``v1,<base64 HMAC-SHA256>`` of ``f"{msg_id}.{timestamp}.{body}"``."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + _as_bytes(body)
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(secret: Secrets, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated (key rotation)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in _as_secret_list(secret))


def build_headers(secret: Secrets, msg_id: str, timestamp: int, body: bytes | str) -> dict[str, str]:
    """The three Standard Webhooks headers plus ``content-type: application/json``."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature_header(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    secret: Secrets,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> None:
    """Check a received webhook's headers against ``body``; return quietly when it is authentic.

    ``secret`` may be several secrets (a receiver rotating keys accepts any of them). Any of the
    space-separated ``v1,`` signatures in the header may match; other versions are ignored.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is malformed or more than
            ``tolerance_s`` seconds away from ``now``, or no signature matches.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lowered.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    msg_id, raw_ts, raw_sigs = (
        lowered["webhook-id"],
        lowered["webhook-timestamp"],
        lowered["webhook-signature"],
    )
    if not raw_ts.isdigit():
        raise WebhookVerificationError(f"webhook-timestamp is not a unix time in seconds: {raw_ts!r}")
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is older than {tolerance_s} s (replay?)")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s} s in the future")

    expected = [sign(s, msg_id, timestamp, body).encode() for s in _as_secret_list(secret)]
    for candidate in raw_sigs.split():
        version, _, _ = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        # compare every pair without short-circuiting on content (constant time per comparison)
        if any(hmac.compare_digest(candidate.encode(), want) for want in expected):
            return
    raise WebhookVerificationError("no webhook-signature matches the body and secret")


# --------------------------------------------------------------------------------------------------
# 2. Target rules (SSRF)
# --------------------------------------------------------------------------------------------------

URL_FIELD = "webhook.url"
MAX_URL_LENGTH = 2048
_PRIVATE_HINT = "private targets are refused unless allow_private_webhooks is set"

Resolver = Callable[[str, int], Sequence[str]]
"""``resolve(host, port) -> [ip, ...]``; raises ``OSError`` when the name does not resolve."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOSTNAME = re.compile(
    r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_LOCALHOST_NAMES = ("localhost", "localhost.", "localhost.localdomain")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to through the system resolver (``getaddrinfo``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``"loopback"``, ``"private"``, ...), or None.

    IPv6 addresses that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the IPv4 address they carry.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = address_problem(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip in _NAT64:
            inner = address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64-embedded {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            if inner:
                return f"6to4-embedded {inner}"
    for name, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return name
    if not ip.is_global:
        return "non-global (special-purpose)"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL.

    ``addresses`` are the checked IP addresses of a named host (empty when the host is an IP
    literal or private targets are allowed); delivery connects to ``addresses[0]``.
    """

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()


def _refuse(message: str) -> InvalidInput:
    return InvalidInput(URL_FIELD, message)


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_webhook_target(
    url: str,
    *,
    allow_private: bool = False,
    resolve: Resolver | None = None,
    max_length: int = MAX_URL_LENGTH,
) -> WebhookTarget:
    """Apply every target rule to ``url`` and return the normalised, resolved target.

    Rules, in order: a string of at most ``max_length`` characters without spaces or control
    characters; scheme http or https; a host; no ``user:password@``; a valid port; a canonical
    host (IPv4 in dotted-quad form, no decimal/octal/hex forms such as ``2130706433`` or
    ``0x7f.1``; hostnames in LDH form after IDNA). Unless ``allow_private``: an IP literal must be
    a public unicast address, ``localhost`` names are refused, and a hostname must resolve (with
    ``resolve``, default ``system_resolver``) to public unicast addresses only.

    Raises:
        InvalidInput: field ``webhook.url``; the message names the rule that failed.
    """
    if not isinstance(url, str):
        raise _refuse("must be a string")
    if len(url) > max_length:
        raise _refuse(f"is longer than {max_length} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _refuse("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _refuse("scheme must be http or https")
    if "@" in parts.netloc:
        raise _refuse("must not contain credentials (user:password@)")
    raw_host = parts.hostname
    if not raw_host:
        raise _refuse("must include a host")
    port = port if port is not None else (443 if scheme == "https" else 80)

    literal = _parse_ip(raw_host) if ":" in raw_host else None  # IPv6 (urlsplit strips the brackets)
    if literal is None:
        try:
            host = raw_host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(f"host {raw_host!r} is not a valid hostname") from None
        last_label = host.rstrip(".").rsplit(".", 1)[-1]
        if _NUMERIC_LABEL.match(last_label):  # a WHATWG "IPv4 host": must be canonical dotted quad
            try:
                literal = ipaddress.IPv4Address(host.rstrip("."))
            except ValueError:
                raise _refuse(f"host {raw_host!r} is a non-canonical numeric address") from None
        elif len(host) > 253 or not _HOSTNAME.match(host):
            raise _refuse(f"host {raw_host!r} is not a valid hostname")
    if literal is not None:
        host = str(literal)

    netloc_host = f"[{host}]" if ":" in host else host
    netloc = netloc_host if parts.port is None else f"{netloc_host}:{parts.port}"
    normalised = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))

    if allow_private:
        return WebhookTarget(normalised, scheme, host, port)
    if literal is not None:
        problem = address_problem(literal)
        if problem:
            raise _refuse(f"host {host} is not a public address ({problem}); {_PRIVATE_HINT}")
        return WebhookTarget(normalised, scheme, host, port)
    if host in _LOCALHOST_NAMES or host.rstrip(".").endswith(".localhost"):
        raise _refuse(f"host {host} names this machine; {_PRIVATE_HINT}")
    try:
        addresses = list((resolve or system_resolver)(host, port))
    except (OSError, UnicodeError):
        raise _refuse(f"host {host} does not resolve") from None
    if not addresses:
        raise _refuse(f"host {host} does not resolve")
    for address in addresses:
        ip = _parse_ip(address.split("%", 1)[0])
        if ip is None:
            raise _refuse(f"host {host} resolves to an unparseable address {address!r}")
        problem = address_problem(ip)
        if problem:
            raise _refuse(
                f"host {host} resolves to {address}, not a public address ({problem}); {_PRIVATE_HINT}"
            )
    return WebhookTarget(normalised, scheme, host, port, tuple(addresses))


def validate_webhook_url(
    url: str,
    *,
    allow_private: bool = False,
    resolve: Resolver | None = None,
    max_length: int = MAX_URL_LENGTH,
) -> str:
    """Check a webhook URL at submission time and return it normalised (see ``check_webhook_target``).

    May block on DNS when ``allow_private`` is false; call it from a thread in async code.

    Raises:
        InvalidInput: field ``webhook.url``, naming the rule that failed.
    """
    return check_webhook_target(url, allow_private=allow_private, resolve=resolve, max_length=max_length).url


# --------------------------------------------------------------------------------------------------
# 3. Event envelope
# --------------------------------------------------------------------------------------------------

EVENT_TYPES = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled", "job.expired")
TERMINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled", "job.expired"})


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WebhookEvent:
    """The JSON body of a webhook: ``{"type": "job.succeeded", "timestamp": ISO8601, "data": job view}``."""

    type: str
    data: Mapping[str, Any]
    timestamp: str = field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise InvalidInput(
                "webhook.event", f"unknown event type {self.type!r}; one of {', '.join(EVENT_TYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able envelope (this is what RQ carries and what is POSTed)."""
        return {"type": self.type, "timestamp": self.timestamp, "data": dict(self.data)}


def encode_event(event: WebhookEvent | Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and POSTed (compact UTF-8 JSON)."""
    payload = event.to_dict() if isinstance(event, WebhookEvent) else dict(event)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_selected(event_type: str, events_filter: Iterable[str] | None) -> bool:
    """Whether a job's events filter asks for ``event_type``.

    ``None`` or empty selects everything. Items are full types (``job.progress``) or short names
    (``started``, ``progress``, ``succeeded``, ...); ``completed`` selects every terminal event.
    """
    wanted = set(events_filter or ())
    if not wanted:
        return True
    short = event_type.removeprefix("job.")
    return (
        event_type in wanted
        or short in wanted
        or ("completed" in wanted and event_type in TERMINAL_EVENT_TYPES)
    )


# --------------------------------------------------------------------------------------------------
# 4. Delivery as an RQ job
# --------------------------------------------------------------------------------------------------

DEFAULT_QUEUE = "ldm-webhooks"
DELIVER_FUNC = "ldm_serve.webhooks.deliver_webhook"
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
        for s in _as_secret_list(config.secret):
            _secret_key(s)  # fail at start-up, not at the first delivery
    with _config_lock:
        _config = config


def get_delivery_config() -> DeliveryConfig:
    """This process's delivery settings (defaults until ``configure_delivery`` is called)."""
    return _config


def attempts_key(job_id: str, prefix: str = "ldm") -> str:
    """Default Redis list holding a job's delivery attempts: ``{prefix}:job:{job_id}:webhooks``."""
    return f"{prefix}:job:{job_id}:webhooks"


def read_delivery_attempts(connection: Redis, key: str) -> list[dict[str, Any]]:
    """A job's recorded delivery attempts, oldest first (for the job view)."""
    return [json.loads(raw) for raw in connection.lrange(key, 0, -1)]


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
    ``record_key`` (default ``attempts_key(job_id)``) and counts it in
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
    key = record_key or attempts_key(job_id)
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


# --------------------------------------------------------------------------------------------------
# 5. A delivery worker that is safe to run in a thread
# --------------------------------------------------------------------------------------------------


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
