"""Gateway state and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from ldm_serve.errors import JobNotFound, QueueUnavailable, Unauthorized
from ldm_serve.jobstore import JobStore, check_job_id
from ldm_serve.results import ResultStore
from ldm_serve.settings import Settings, owner_of
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

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    async def visible_job(self, job_id: str, owner: str | None) -> dict[str, str]:
        """The job record, if it exists and the caller may see it (else JobNotFound).

        Every ``/v1/jobs/{job_id}...`` route starts here: an id not of the job-id format
        (``<id>:events``, ``../x``) is a 404 ``job_not_found`` before any Redis key is built.
        """
        check_job_id(job_id)
        rec = await self.call(self.store.get, job_id)
        if self.settings.auth_enabled and rec.get("owner", "") != (owner or ""):
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")
        if await self.call(self.store.expire_if_stale, job_id, rec):
            rec = await self.call(self.store.get, job_id)
        return rec


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def current_owner(gw: GatewayDep, authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The caller's owner id when API keys are on (401 without a valid key), else None."""
    if not gw.settings.auth_enabled:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("authorization: send `Authorization: Bearer <api key>`")
    token = token.strip()
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in gw.settings.api_key_set):
        raise Unauthorized("authorization: the API key is not valid")
    return owner_of(token)


OwnerDep = Annotated[str | None, Depends(current_owner)]


def translate_async_redis(exc: Exception) -> Exception:
    """Map an async Redis connectivity error to QueueUnavailable (others unchanged)."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return QueueUnavailable(f"Redis is unreachable: {exc}")
    return exc
