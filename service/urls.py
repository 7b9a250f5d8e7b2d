"""Access to a job's images and events by API key or by a signed URL (:mod:`ldm_serve.signed_urls`).

A request carrying ``expires`` and ``signature`` query parameters is checked against the
path it asks for; a valid, unexpired signature stands for the job's owner (no
``Authorization`` header needed, as ``<img>`` and ``EventSource`` cannot send one). A bad
or expired signature is refused with 403 naming ``signature``; without the parameters
the usual bearer key applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from ldm_serve.errors import Forbidden
from ldm_serve.signed_urls import verify
from service.deps import GatewayDep, current_caller


@dataclass(frozen=True)
class JobAccess:
    owner: str | None
    signed: bool


def job_access(
    request: Request,
    gw: GatewayDep,
    authorization: Annotated[str | None, Header()] = None,
    expires: Annotated[int | None, Query(ge=0, description="signed URLs: expiry (unix seconds)")] = None,
    signature: Annotated[str | None, Query(max_length=128, description="signed URLs: HMAC-SHA256 hex")] = None,
) -> JobAccess:
    """Who may read this job resource: a signed URL, else the bearer key's owner."""
    if expires is None and signature is None:
        return JobAccess(owner=current_caller(gw, authorization).owner, signed=False)
    secret = gw.settings.url_signing_secret
    if not secret or not gw.settings.public_base_url:
        raise Forbidden("signature", "signed URLs are not enabled on this server (no public_base_url)")
    if expires is None or signature is None:
        raise Forbidden("signature", "a signed URL needs both `expires` and `signature`")
    why = verify(secret, request.scope["path"], expires, signature)
    if why is not None:
        raise Forbidden("signature", why)
    return JobAccess(owner=None, signed=True)


JobAccessDep = Annotated[JobAccess, Depends(job_access)]
