"""Service routes: models, health, readiness, metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ldm_serve.contract import WorkerInfo
from ldm_serve.errors import Forbidden, QueueUnavailable
from service.deps import Gateway, GatewayDep, OwnerDep, current_caller

router = APIRouter(tags=["service"])

UNTRAINED_WARNING = "UNTRAINED: random weights for testing; images are noise"


@router.get("/v1/models", summary="Models served by live workers")
async def list_models(gw: GatewayDep, _owner: OwnerDep) -> dict[str, Any]:
    return {"object": "list", "data": model_entries(await gw.call(gw.store.live_workers))}


def model_entries(workers: list[WorkerInfo]) -> list[dict[str, Any]]:
    """One entry per model of the live ``workers``, sorted by id (REST ``/v1/models`` and gRPC ``ListModels``)."""
    models: dict[str, dict[str, Any]] = {}
    for w in workers:
        m = models.setdefault(
            w.model,
            {
                "id": w.model,
                "object": "model",
                "untrained": w.untrained,
                "workers": 0,
                "inpaint_mode": w.inpaint_mode,
                "default_size": w.default_size,
                "downsample_factor": w.downsample_factor,
                "max_prompt_tokens": w.max_prompt_tokens,
                "max_batch_rows": w.max_batch_rows,
                "constraints": w.constraints.model_dump() if w.constraints else None,
            },
        )
        m["workers"] += 1
        if w.untrained:
            m["warning"] = UNTRAINED_WARNING
    return sorted(models.values(), key=lambda m: m["id"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis reachable and at least one worker alive")
async def readyz(gw: GatewayDep) -> JSONResponse:
    body = await readiness(gw)
    return JSONResponse(body, 200 if body["status"] == "ready" else 503)


async def readiness(gw: Gateway) -> dict[str, Any]:
    """``/readyz``'s answer (and the gRPC health status): ready when Redis answers and a worker is alive."""
    try:
        await gw.call(gw.store.ping)
        workers = await gw.call(gw.store.live_workers)
    except QueueUnavailable as exc:
        return {"status": "not_ready", "redis": False, "workers": 0, "reason": str(exc)}
    if not workers:
        notes = await gw.call(gw.store.supervisor_notes)  # e.g. "worker restarting after exit code -9, ..."
        reason = "no live worker" + (f" ({'; '.join(notes)})" if notes else "")
        return {"status": "not_ready", "redis": True, "workers": 0, "reason": reason}
    return {"status": "ready", "redis": True, "workers": len(workers)}


def metrics_access(gw: GatewayDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """With ``metrics_require_admin``: 401 without a key, 403 for a key without ``admin``."""
    if gw.settings.metrics_require_admin and not current_caller(gw, authorization).policy.admin:
        raise Forbidden("authorization", "/metrics needs an admin key (metrics_require_admin is on)")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(gw: GatewayDep, _admin: Annotated[None, Depends(metrics_access)]) -> Response:
    try:
        depth = await gw.call(gw.store.queue_depth)
        gw.metrics.workers_alive.set(len(await gw.call(gw.store.live_workers)))
        for queue, n in depth.items():
            gw.metrics.queue_depth.labels(queue).set(n)
        for state, n in (await gw.call(gw.store.webhook_backlog)).items():
            gw.metrics.webhook_backlog.labels(state).set(n)
    except QueueUnavailable:
        pass  # the request counters are still worth scraping
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
