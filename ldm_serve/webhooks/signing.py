"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign, verify, secrets.

A ``whsec_<base64 key>`` secret; ``webhook-signature: v1,<base64 HMAC-SHA256(key,
f"{id}.{timestamp}.{body}")>``; several space-separated signatures allow key rotation.
(Signed *result URLs* are another thing: :mod:`ldm_serve.signed_urls`.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

from ldm_serve.errors import InvalidInput, WebhookVerificationError

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
_MIN_KEY_BYTES = 16

Secrets = str | Sequence[str]


def generate_secret(n_bytes: int = 32) -> str:
    """Return a fresh random ``whsec_<base64>`` signing secret of ``n_bytes`` key bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(n_bytes)).decode("ascii")


def secret_key_bytes(secret: str) -> bytes:
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


def as_secret_list(secret: Secrets) -> list[str]:
    return [secret] if isinstance(secret, str) else list(secret)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """Standard Webhooks signature ``v1,<base64 HMAC-SHA256>`` of ``f"{msg_id}.{timestamp}.{body}"``."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + _as_bytes(body)
    digest = hmac.new(secret_key_bytes(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(secret: Secrets, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated (key rotation)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in as_secret_list(secret))


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

    expected = [sign(s, msg_id, timestamp, body).encode() for s in as_secret_list(secret)]
    for candidate in raw_sigs.split():
        version, _, _ = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        # compare every pair without short-circuiting on content (constant time per comparison)
        if any(hmac.compare_digest(candidate.encode(), want) for want in expected):
            return
    raise WebhookVerificationError("no webhook-signature matches the body and secret")
