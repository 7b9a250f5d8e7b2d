"""Job routes: status, images, events (SSE) and cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ldm_serve.contract import GenerationPayload, JobStatus, OutputFormat
from ldm_serve.errors import InvalidInput, ResultNotReady
from ldm_serve.jobview import job_view
from service.deps import Gateway, GatewayDep, OwnerDep
from service.streams import sse_stream

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def public_job(gw: Gateway, job_id: str, rec: dict[str, str]) -> dict[str, Any]:
    """The job view with its queue position (while queued) and webhook deliveries."""
    position = None
    if rec["status"] == JobStatus.QUEUED.value:
        position = await gw.call(gw.store.queue_position, job_id, rec["model"], rec["priority"])
    has_hook = GenerationPayload.model_validate_json(rec["payload"]).webhook is not None
    attempts = await gw.call(gw.store.webhook_attempts, job_id) if has_hook else None
    return job_view(rec, queue_position=position, webhook_attempts=attempts)


@router.get("/{job_id}", summary="Job status, progress, seeds and result links")
async def get_job(job_id: str, gw: GatewayDep, owner: OwnerDep) -> dict[str, Any]:
    rec = await gw.visible_job(job_id, owner)
    return await public_job(gw, job_id, rec)


@router.get(
    "/{job_id}/images/{index}",
    summary="Image bytes",
    responses={200: {"content": {f.content_type: {} for f in OutputFormat}}},
)
async def get_image(job_id: str, index: int, gw: GatewayDep, owner: OwnerDep) -> Response:
    rec = await gw.visible_job(job_id, owner)
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


@router.get("/{job_id}/events", summary="Server-sent events: status, progress, image; ends with `done`")
async def job_events(
    job_id: str,
    request: Request,
    gw: GatewayDep,
    owner: OwnerDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    await gw.visible_job(job_id, owner)

    async def final_view() -> dict[str, Any]:
        return await public_job(gw, job_id, await gw.call(gw.store.get, job_id))

    return StreamingResponse(
        sse_stream(gw, job_id, last_event_id, request.is_disconnected, final_view),
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
