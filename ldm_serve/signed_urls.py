"""Signed, absolute, expiring URLs for job results (browsers and webhook consumers cannot
send a bearer header to ``<img>`` or ``EventSource``).

Off unless ``public_base_url`` is set. A signed URL is
``{public_base_url}{path}?expires={unix s}&signature={hex}``, where the signature is
HMAC-SHA256 under ``url_signing_secret`` of ``"{path}\\n{expires}"``. Only the path the
gateway serves is signed (not the host), so a proxy may mount the gateway under a prefix
of ``public_base_url``. Expiry times are rounded up to the minute so that a job view
polled within a minute shows the same URLs (cache friendly).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable

from ldm_serve.settings import Settings

UrlSigner = Callable[[str], str]


def signature(secret: str, path: str, expires: int) -> str:
    """Hex HMAC-SHA256 of a path and its expiry time."""
    return hmac.new(secret.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign_url(base_url: str, secret: str, path: str, ttl_s: int, now: float | None = None) -> str:
    """``base_url + path`` with ``expires`` (at least ``ttl_s`` from now, rounded up to the minute) and its signature."""
    t = time.time() if now is None else now
    expires = int(math.ceil((t + ttl_s) / 60.0) * 60)
    return f"{base_url.rstrip('/')}{path}?expires={expires}&signature={signature(secret, path, expires)}"


def verify(secret: str, path: str, expires: int, sig: str, now: float | None = None) -> str | None:
    """None when ``sig`` is a valid, unexpired signature of ``path``; else why it is not."""
    t = time.time() if now is None else now
    if not hmac.compare_digest(signature(secret, path, expires).encode(), sig.encode()):
        return "does not match this URL"
    if expires < t:
        return "has expired"
    return None


def url_signer(settings: Settings) -> UrlSigner | None:
    """The function turning a job path into its public signed URL, or None when signed URLs are off."""
    base, secret = settings.public_base_url, settings.url_signing_secret
    if not base or not secret:
        return None
    ttl = settings.signed_url_ttl_s

    def sign(path: str) -> str:
        return sign_url(base, secret, path, ttl)

    return sign
