"""The public job view (ldm_serve/jobview.py), built from a job record hash without Redis."""

from __future__ import annotations

import json

from ldm_serve.contract import GenerationPayload, JobKind, OutputFormat, WebhookSpec, new_job_id
from ldm_serve.jobview import image_url, iso, job_links, job_view


def record(payload: GenerationPayload, **fields: str) -> dict[str, str]:
    return {"payload": payload.model_dump_json(), "status": "queued", "created_at": "0", **fields}


def payload(**kw) -> GenerationPayload:
    base = dict(job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="a cat", n=3, width=64, height=64,
                steps=10, guidance_scale=5.0, seeds=[11, 12, 13], created_at=0.0, output_format=OutputFormat.JPEG)
    return GenerationPayload(**{**base, **kw})


def test_iso_times() -> None:
    assert iso(None) is None and iso("") is None
    assert iso(0) == "1970-01-01T00:00:00Z" and iso("1.5") == "1970-01-01T00:00:01.500000Z"


def test_a_queued_job() -> None:
    p = payload(metadata={"user": "u1"})
    view = job_view(record(p), queue_position=2)
    assert view["id"] == p.job_id and view["object"] == "job" and view["status"] == "queued"
    assert view["kind"] == "txt2img" and view["model"] == "m" and view["queue_position"] == 2
    assert view["created_at"] == "1970-01-01T00:00:00Z" and view["started_at"] is None
    assert view["progress"] == {"step": 0, "total": 0, "fraction": 0.0}
    assert view["images"] == [] and view["error"] is None and view["warnings"] == [] and view["batch"] is None
    assert view["seeds"] == [11, 12, 13] and view["metadata"] == {"user": "u1"}
    assert view["parameters"] == {"prompt": "a cat", "negative_prompt": "", "n": 3, "width": 64, "height": 64,
                                  "steps": 10, "guidance_scale": 5.0, "eta": 0.0, "output_format": "jpeg",
                                  "quality": 90, "priority": "normal"}
    assert "webhook" not in view
    assert view["links"] == {"self": f"/v1/jobs/{p.job_id}", "events": f"/v1/jobs/{p.job_id}/events",
                             "cancel": f"/v1/jobs/{p.job_id}/cancel"}


def test_a_running_job_with_progress_images_batch_and_warnings() -> None:
    p = payload()
    rec = record(p, status="running", step="4", total="10", attempts="1", cancel_requested="1",
                 **{"image:2": "1", "image:0": "1"}, batch=json.dumps({"id": "b", "jobs": 2}),
                 warnings=json.dumps(["prompt truncated"]), started_at="2")
    view = job_view(rec)
    assert view["progress"] == {"step": 4, "total": 10, "fraction": 0.4}
    assert view["attempts"] == 1 and view["cancel_requested"] is True
    assert [(i["index"], i["seed"]) for i in view["images"]] == [(0, 11), (2, 13)]  # in index order
    assert view["images"][0]["url"] == f"/v1/jobs/{p.job_id}/images/0"
    assert view["images"][0]["content_type"] == "image/jpeg"
    assert view["batch"] == {"id": "b", "jobs": 2} and view["warnings"] == ["prompt truncated"]


def test_a_failed_job_and_webhook_deliveries() -> None:
    p = payload(webhook=WebhookSpec(url="https://example.com/h"))
    error = {"type": "invalid_input", "field": "steps", "message": "too many"}
    attempts = [{"attempt": 1, "result": "delivered"}]
    view = job_view(record(p, status="failed", error=json.dumps(error), finished_at="3"), webhook_attempts=attempts)
    assert view["error"] == error and view["finished_at"] == "1970-01-01T00:00:03Z"
    assert view["webhook"] == {"url": "https://example.com/h", "events": ["start", "completed"],
                               "deliveries": attempts}
    assert job_view(record(p))["webhook"]["deliveries"] == []


def test_signed_links_when_a_signer_is_given() -> None:
    p = payload()
    signer = lambda path: f"https://api.example{path}?sig=x"  # noqa: E731
    view = job_view(record(p, **{"image:1": "1"}), signer=signer)
    assert view["images"][0]["url"] == f"https://api.example/v1/jobs/{p.job_id}/images/1?sig=x"
    assert view["links"]["events"] == f"https://api.example/v1/jobs/{p.job_id}/events?sig=x"
    assert view["links"]["self"] == f"/v1/jobs/{p.job_id}"  # self and cancel need the key anyway
    assert job_links("j")["cancel"] == "/v1/jobs/j/cancel" and image_url("j", 0) == "/v1/jobs/j/images/0"
