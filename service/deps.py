"""Gateway state and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from ldm_serve.api_keys import Caller, KeyRing
from ldm_serve.errors import JobNotFound, QueueUnavailable, Unauthorized
from ldm_serve.jobstore import JobStore, check_job_id
from ldm_serve.quotas import QuotaLimiter
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings
from ldm_serve.signed_urls import UrlSigner
from service.metrics import GatewayMetrics
from service.schemas import Schemas


@dataclass
class Gateway:
    """Everything a route needs, built once in the app's lifespan."""

    settings: Settings
    store: JobStore  # synchronous; call through run_in_threadpool
    aredis: aioredis.Redis  # for blocking stream reads (SSE, Prefer: wait)
    results: ResultStore
    schemas: Schemas
    metrics: GatewayMetrics
    keyring: KeyRing  # accepted keys and their policies (ldm_serve.api_keys)
    limiter: QuotaLimiter  # per-key quotas (ldm_serve.quotas)
    signer: UrlSigner | None = None  # signed absolute result URLs, when public_base_url is set

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    async def visible_job(self, job_id: str, owner: str | None, *, signed: bool = False) -> dict[str, str]:
        """The job record, if it exists and the caller may see it (else JobNotFound).

        Every ``/v1/jobs/{job_id}...`` route starts here: an id not of the job-id format
        (``<id>:events``, ``../x``) is a 404 ``job_not_found`` before any Redis key is built.
        ``signed``: the request carries a valid signed URL for this job, which stands for its owner.
        """
        check_job_id(job_id)
        rec = await self.call(self.store.get, job_id)
        if self.settings.auth_enabled and not signed and rec.get("owner", "") != (owner or ""):
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")
        if await self.call(self.store.expire_if_stale, job_id, rec):
            rec = await self.call(self.store.get, job_id)
        return rec


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def current_caller(gw: GatewayDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The caller (owner id and key policy) when API keys are on (401 without a valid key), else anonymous."""
    if not gw.keyring.enabled:
        return gw.keyring.anonymous()
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("authorization: send `Authorization: Bearer <api key>`")
    caller = gw.keyring.lookup(token.strip())
    if caller is None:
        raise Unauthorized("authorization: the API key is not valid")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def current_owner(caller: CallerDep) -> str | None:
    """The caller's owner id when API keys are on, else None."""
    return caller.owner


OwnerDep = Annotated[str | None, Depends(current_owner)]


def quota_subject(caller: Caller, request: Request) -> str:
    """Whose quota a request spends: the key's owner id, or the client address when auth is off."""
    return subject_of(caller, request.client.host if request.client else None)


def subject_of(caller: Caller, client_host: str | None) -> str:
    """Whose quota a caller spends (REST and gRPC alike): its owner id, else ``ip:<client address>``."""
    if caller.owner is not None:
        return caller.owner
    return f"ip:{client_host or 'unknown'}"


def translate_async_redis(exc: Exception) -> Exception:
    """Map an async Redis connectivity error to QueueUnavailable (others unchanged)."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return QueueUnavailable(f"Redis is unreachable: {exc}")
    return exc
