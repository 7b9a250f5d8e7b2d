"""The job contract (ldm_serve/contract.py): ids, statuses, queue and key names, the payload, WorkerInfo."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ldm_serve.contract import (
    PRIORITY_ORDER,
    TERMINAL_STATUSES,
    GenerationPayload,
    JobKind,
    JobStatus,
    Keys,
    ModelConstraints,
    OutputFormat,
    Priority,
    WebhookEventType,
    WebhookSpec,
    WorkerInfo,
    batch_key,
    is_job_id,
    new_job_id,
    queue_name,
    webhook_queue_name,
)


def payload(**kw) -> GenerationPayload:
    fields = dict(job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="p", n=2, width=64, height=32,
                  steps=4, guidance_scale=5.0, seeds=[7, 8], created_at=1.0)
    return GenerationPayload(**{**fields, **kw})


def test_job_ids_are_unique_and_have_one_format() -> None:
    ids = [new_job_id() for _ in range(500)]
    assert len(set(ids)) == 500 and all(len(i) == 26 and is_job_id(i) for i in ids)
    assert not is_job_id(ids[0] + ":events") and not is_job_id(ids[0].upper()) and not is_job_id(None)


def test_statuses_terminal_and_priorities_in_drain_order() -> None:
    assert TERMINAL_STATUSES == {"succeeded", "failed", "canceled", "expired"}
    assert not JobStatus.QUEUED.terminal and not JobStatus.RUNNING.terminal and JobStatus.EXPIRED.terminal
    assert PRIORITY_ORDER == (Priority.HIGH, Priority.NORMAL, Priority.LOW)
    assert OutputFormat.WEBP.content_type == "image/webp"


def test_queue_and_key_names_come_from_one_prefix() -> None:
    assert queue_name("ldm", "tiny", "high") == "ldm-tiny-high"
    assert queue_name("p", "tiny", Priority.LOW) == "p-tiny-low"
    with pytest.raises(ValueError):
        queue_name("ldm", "tiny", "urgent")
    assert webhook_queue_name("p") == "p-webhooks"
    keys = Keys("p")
    assert keys.job("j") == "p:job:j" and keys.events("j") == "p:job:j:events"
    assert keys.image("j", 3) == "p:job:j:image:3" and keys.input("j", "mask") == "p:job:j:input:mask"
    assert keys.webhook_attempts("j") == "p:job:j:webhooks" and keys.cancel("j") == "p:job:j:cancel"
    assert keys.idempotency(None, "k") == "p:idem:-:k" and keys.owner_jobs("o") == "p:owner:o:jobs"
    assert keys.heartbeat("w") == "p:worker:w:hb" and keys.worker_jobs("w") == "p:worker:w:jobs"
    assert keys.models == "p:models" and keys.workers == "p:workers" and keys.supervisor == "p:supervisor"
    assert set(keys.all_job_keys("j")) == {"p:job:j", "p:job:j:events", "p:job:j:cancel", "p:job:j:webhooks"}
    assert Keys().job("j") == "ldm:job:j"


def test_payload_round_trips_through_json_and_refuses_unknowns() -> None:
    p = payload(webhook=WebhookSpec(url="https://example.com/hook"), metadata={"a": [1]})
    data = p.model_dump(mode="json")
    assert GenerationPayload.model_validate_json(p.model_dump_json()) == p
    assert data["v"] == 1 and data["kind"] == "txt2img" and data["priority"] == "normal"
    assert data["webhook"]["events"] == ["start", "completed"]  # the default filter
    for bad in ({"v": 2}, {"extra": 1}, {"n": 0}, {"width": 4}, {"steps": 0}, {"quality": 101}, {"kind": "x"}):
        with pytest.raises(ValidationError):
            GenerationPayload.model_validate({**data, **bad})
    with pytest.raises(ValidationError):
        p.n = 3  # type: ignore[misc]  # frozen
    with pytest.raises(ValidationError):
        WebhookSpec(url="https://example.com", events=["sometimes"])
    assert WebhookSpec(url="u", events=["progress"]).events == [WebhookEventType.PROGRESS]


def test_batch_key_is_model_and_size() -> None:
    assert payload().batch_key == batch_key("m", 64, 32) == "m|64x32"
    assert payload(width=32, height=64).batch_key != payload().batch_key
    assert payload(prompt="other", steps=9, seeds=[1, 2]).batch_key == payload().batch_key


def test_worker_info_round_trips_with_and_without_constraints() -> None:
    info = WorkerInfo(name="w", model="m", max_batch_rows=8, pid=1, host="h", started_at=2.0,
                      constraints=ModelConstraints(size_multiple=8, min_side=16, max_width=128, max_height=64))
    again = WorkerInfo.model_validate_json(info.model_dump_json())
    assert again == info and again.constraints.size_multiple == 8
    old = WorkerInfo.model_validate({"name": "w", "model": "m", "max_batch_rows": 8, "pid": 1, "host": "h",
                                     "started_at": 2.0})
    assert old.constraints is None and old.untrained is False
    with pytest.raises(ValidationError):
        ModelConstraints(size_multiple=0, min_side=16, max_width=128, max_height=64)
