"""Job routes: listing, status, images, events (SSE), cancel and delete."""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ldm_serve.contract import GenerationPayload, JobStatus, OutputFormat
from ldm_serve.errors import InvalidInput, JobNotFound, ResultNotReady
from ldm_serve.jobview import job_view
from service.deps import Gateway, GatewayDep, OwnerDep
from service.streams import sse_stream, wait_for_terminal
from service.urls import JobAccessDep

LIST_LIMIT_MAX = 100
DELETE_WAIT_S = 10  # how long DELETE waits for a worker to drop a running job before answering 202

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def public_job(gw: Gateway, job_id: str, rec: dict[str, str]) -> dict[str, Any]:
    """The job view with its queue position (while queued) and webhook deliveries."""
    position = None
    if rec["status"] == JobStatus.QUEUED.value:
        position = await gw.call(gw.store.queue_position, job_id, rec["model"], rec["priority"])
    has_hook = GenerationPayload.model_validate_json(rec["payload"]).webhook is not None
    attempts = await gw.call(gw.store.webhook_attempts, job_id) if has_hook else None
    return job_view(rec, queue_position=position, webhook_attempts=attempts, signer=gw.signer)


@router.get("/{job_id}", summary="Job status, progress, seeds and result links")
async def get_job(job_id: str, gw: GatewayDep, owner: OwnerDep) -> dict[str, Any]:
    rec = await gw.visible_job(job_id, owner)
    return await public_job(gw, job_id, rec)


@router.get(
    "/{job_id}/images/{index}",
    summary="Image bytes",
    responses={200: {"content": {f.content_type: {} for f in OutputFormat}}},
)
async def get_image(job_id: str, index: int, gw: GatewayDep, access: JobAccessDep) -> Response:
    rec = await gw.visible_job(job_id, access.owner, signed=access.signed)
    payload = GenerationPayload.model_validate_json(rec["payload"])
    if not 0 <= index < payload.n:
        raise InvalidInput("index", f"must be in [0, {payload.n - 1}] for a job with n={payload.n}, got {index}")
    data = await gw.call(gw.results.get_image, job_id, index)
    if data is None:
        raise ResultNotReady(f"image {index} of job {job_id} is not available (status: {rec['status']})")
    return Response(
        content=data,
        media_type=OutputFormat(payload.output_format).content_type,
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.get("/{job_id}/events", summary="Server-sent events: status, queue (position), progress, image; ends with `done`")
async def job_events(
    job_id: str,
    request: Request,
    gw: GatewayDep,
    access: JobAccessDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    await gw.visible_job(job_id, access.owner, signed=access.signed)

    async def final_view() -> dict[str, Any]:
        return await public_job(gw, job_id, await gw.call(gw.store.get, job_id))

    async def queue_position() -> int | None:
        try:
            rec = await gw.call(gw.store.get, job_id)
        except JobNotFound:
            return None
        if rec["status"] != JobStatus.QUEUED.value:
            return None
        return await gw.call(gw.store.queue_position, job_id, rec["model"], rec["priority"])

    return StreamingResponse(
        sse_stream(gw, job_id, last_event_id, request.is_disconnected, final_view, queue_position),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel_job(job_id: str, gw: GatewayDep, owner: OwnerDep) -> JSONResponse:
    await gw.visible_job(job_id, owner)
    status = await gw.call(gw.store.cancel, job_id)
    view = await public_job(gw, job_id, await gw.call(gw.store.get, job_id))
    # 200 once canceled (or already terminal); 202 while the worker has yet to drop the job's rows.
    return JSONResponse(view, status_code=202 if status is JobStatus.RUNNING else 200)


@router.get("", summary="The caller's jobs, newest first (paginated with `cursor`, filtered by `status`)")
async def list_jobs(
    gw: GatewayDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description="jobs per page")] = 20,
    status: Annotated[list[JobStatus] | None, Query(description="only these statuses (repeatable)")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")] = None,
) -> dict[str, Any]:
    after = decode_cursor(cursor) if cursor else None
    statuses = frozenset(s.value for s in status) if status else None
    recs, nxt = await gw.call(gw.store.list_jobs, owner, limit=limit, statuses=statuses, after=after)
    return {
        "object": "list",
        "data": [job_view(rec, signer=gw.signer) for rec in recs],
        "next_cursor": encode_cursor(nxt) if nxt else None,
        "has_more": nxt is not None,
    }


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a job: its record, images, inputs and events (a live job is canceled first)",
    responses={202: {"description": "the job is being canceled; it is deleted when its worker drops it"}},
)
async def delete_job(job_id: str, gw: GatewayDep, owner: OwnerDep) -> Response:
    rec = await gw.visible_job(job_id, owner)
    if not JobStatus(rec["status"]).terminal:
        await gw.call(gw.store.request_delete, job_id)  # whoever ends the job deletes it
        if not (await gw.call(gw.store.cancel, job_id)).terminal:
            await wait_for_terminal(gw, job_id, min(DELETE_WAIT_S, gw.settings.job_timeout_s))
            try:
                rec = await gw.call(gw.store.get, job_id)
            except JobNotFound:
                return Response(status_code=204)
            if not JobStatus(rec["status"]).terminal:
                return JSONResponse(await public_job(gw, job_id, rec), status_code=202)
    await gw.call(gw.store.delete, job_id)
    return Response(status_code=204)


def encode_cursor(position: tuple[float, str]) -> str:
    """Opaque page token of a ``(created_at, job_id)`` position."""
    return base64.urlsafe_b64encode(f"{position[0]!r} {position[1]}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        score, job_id = raw.split(" ", 1)
        value = float(score)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor", "is not a next_cursor returned by this endpoint") from None
    if not math.isfinite(value) or not job_id:
        raise InvalidInput("cursor", "is not a next_cursor returned by this endpoint")
    return value, job_id
