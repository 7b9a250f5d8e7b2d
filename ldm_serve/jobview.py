"""The public JSON view of a job, built from its Redis record.

Used by the gateway (``GET /v1/jobs/{id}``, SSE, ``Prefer: wait``) and by the
worker (webhook event bodies), so a client sees one representation everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from ldm_serve.contract import GenerationPayload, JobKind, OutputFormat


def iso(ts: str | float | None) -> str | None:
    """Unix seconds -> ISO 8601 UTC, or None."""
    if ts in (None, ""):
        return None
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat().replace("+00:00", "Z")


def job_links(job_id: str, signer: Callable[[str], str] | None = None) -> dict[str, str]:
    """Relative links of a job; with ``signer`` (signed URLs on) the events link is absolute and signed."""
    base = f"/v1/jobs/{job_id}"
    events = f"{base}/events"
    return {"self": base, "events": signer(events) if signer else events, "cancel": f"{base}/cancel"}


def image_url(job_id: str, index: int, signer: Callable[[str], str] | None = None) -> str:
    path = f"/v1/jobs/{job_id}/images/{index}"
    return signer(path) if signer else path


def job_view(
    rec: dict[str, str],
    *,
    queue_position: int | None = None,
    webhook_attempts: list[dict[str, Any]] | None = None,
    signer: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Public job dict from the record hash written by :class:`ldm_serve.jobstore.JobStore`.

    ``signer`` (:func:`ldm_serve.signed_urls.url_signer`) makes image and events links absolute
    signed URLs that work without an API key.
    """
    payload = GenerationPayload.model_validate_json(rec["payload"])
    job_id = payload.job_id
    fmt = OutputFormat(payload.output_format)
    step, total = int(rec.get("step", 0) or 0), int(rec.get("total", 0) or 0)
    done = sorted(int(k.split(":", 1)[1]) for k in rec if k.startswith("image:"))
    error = json.loads(rec["error"]) if rec.get("error") else None
    view: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "kind": payload.kind.value,
        "status": rec["status"],
        "model": payload.model,
        "created_at": iso(rec.get("created_at")),
        "started_at": iso(rec.get("started_at")),
        "finished_at": iso(rec.get("finished_at")),
        "progress": {"step": step, "total": total, "fraction": (step / total) if total else 0.0},
        "queue_position": queue_position,
        "attempts": int(rec.get("attempts", 0) or 0),
        "cancel_requested": rec.get("cancel_requested") == "1",
        "error": error,
        "warnings": json.loads(rec["warnings"]) if rec.get("warnings") else [],
        "seeds": list(payload.seeds),
        "parameters": {
            "prompt": payload.prompt,
            "negative_prompt": payload.negative_prompt,
            "n": payload.n,
            "width": payload.width,
            "height": payload.height,
            "steps": payload.steps,
            "guidance_scale": payload.guidance_scale,
            "eta": payload.eta,
            **({"strength": payload.strength} if payload.kind is JobKind.IMG2IMG else {}),
            "output_format": fmt.value,
            "quality": payload.quality,
            "priority": payload.priority.value,
        },
        "metadata": payload.metadata,
        "images": [
            {"index": i, "seed": payload.seeds[i], "url": image_url(job_id, i, signer), "content_type": fmt.content_type}
            for i in done
        ],
        "batch": json.loads(rec["batch"]) if rec.get("batch") else None,
        "links": job_links(job_id, signer),
    }
    if payload.webhook is not None:
        view["webhook"] = {
            "url": payload.webhook.url,
            "events": [e.value for e in payload.webhook.events],
            "deliveries": webhook_attempts or [],
        }
    return view
