"""Import boundaries and settings of the serving side."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from ldm_serve.contract import GenerationPayload, JobKind, JobStatus, Keys, new_job_id, queue_name
from ldm_serve.settings import Settings


@pytest.mark.parametrize(
    "module", ["service.app", "service.grpc_api.server", "ldm_serve.contract", "ldm_serve.jobstore", "ldm_serve.settings"]
)
def test_gateway_side_never_imports_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_contract_imports_neither_fastapi_nor_torch() -> None:
    code = "import sys, ldm_serve.contract; sys.exit(bool({'fastapi', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_settings_are_read_when_built_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("LDM_MAX_STEPS", "12")
    s = Settings()
    assert s.redis_url == "redis://example:6380/2" and s.max_steps == 12
    assert Settings(max_steps=3).max_steps == 3  # explicit values win over the environment


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_images": 9, "max_batch_rows": 8}, "max_images"),
        ({"max_width": 1020}, "multiples of 8"),
        ({"webhook_secret": "plain"}, "whsec_"),
        ({"heartbeat_ttl_s": 1, "heartbeat_interval_s": 2}, "heartbeat_ttl_s"),
        ({"max_wait_s": 61}, "max_wait_s"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**kwargs)


def test_payload_is_versioned_and_strict() -> None:
    p = GenerationPayload(job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="p", n=1, width=64,
                          height=64, steps=4, guidance_scale=1.0, seeds=[1], created_at=0.0)
    data = p.model_dump(mode="json")
    assert data["v"] == 1 and GenerationPayload.model_validate(data) == p
    with pytest.raises(ValidationError):
        GenerationPayload.model_validate({**data, "v": 2})
    with pytest.raises(ValidationError):
        GenerationPayload.model_validate({**data, "surprise": True})
    assert p.batch_key == "m|64x64"


def test_key_names_and_statuses() -> None:
    k = Keys("pre")
    assert k.job("x") == "pre:job:x" and k.events("x") == "pre:job:x:events"
    assert queue_name("pre", "m", "high") == "pre-m-high"
    assert {s.value for s in JobStatus if s.terminal} == {"succeeded", "failed", "canceled", "expired"}
    assert len(new_job_id()) == 26
