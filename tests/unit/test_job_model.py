"""The job model (issue 11): one mapping request -> payload -> engine row, one source of limits, and
the model's limits checked at the gateway (ldm_serve.model_limits) exactly as the model checks them."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm_serve.contract import (
    JOB_FIELDS,
    REQUEST_FIELDS,
    ROW_FIELDS,
    GenerationPayload,
    JobKind,
    ModelConstraints,
    WorkerInfo,
    new_job_id,
)
from ldm_serve.errors import InvalidInput
from ldm_serve.limits import GUIDANCE_SCALE_MAX, SEED_MAX
from ldm_serve.model_limits import check_request, format_ranges, model_constraints
from ldm_serve.settings import Settings
from service.schemas import build_schemas
from tests.checkpoints import TINY_LDM_CLASS, TINY_SD1, TINY_SD1_INPAINT, write_original_checkpoint
from worker.main import model_constraints_of

# Request fields the gateway resolves itself instead of copying them (model id, size, seeds, webhook,
# inpainting uploads). A new request field must be added here or to REQUEST_FIELDS.
RESOLVED_BY_GATEWAY = {"model", "width", "height", "seed", "webhook", "webhook_events_filter", "mask_resize",
                       "image", "mask"}
ROW_ONLY = {"seed", "image", "mask"}  # per-row values the worker adds to payload.row_kwargs()
IMG2IMG_ONLY = {"strength"}  # request fields of /v1/img2img alone (the payload's default serves the other kinds)


def payload(**overrides) -> GenerationPayload:
    fields = dict(job_id=new_job_id(), kind=JobKind.TXT2IMG, model="m", prompt="a cat", negative_prompt="dog",
                  n=2, width=64, height=64, steps=10, guidance_scale=5.0, eta=0.25, seeds=[1, 2],
                  created_at=time.time())
    return GenerationPayload(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------ the mappings


def test_every_payload_field_is_a_row_field_or_a_job_field() -> None:
    assert set(ROW_FIELDS).isdisjoint(JOB_FIELDS)
    assert set(ROW_FIELDS) | set(JOB_FIELDS) == set(GenerationPayload.model_fields)


def test_row_fields_are_exactly_the_engine_rows_fields_the_payload_holds() -> None:
    row_fields = {f.name for f in dataclasses.fields(GenerationRow)}
    assert set(ROW_FIELDS) | ROW_ONLY == row_fields


def test_every_request_field_is_copied_or_resolved() -> None:
    schemas = build_schemas(Settings())
    for request in (schemas.Txt2ImgRequest, schemas.InpaintRequest, schemas.InpaintForm, schemas.Img2ImgRequest,
                    schemas.Img2ImgForm):
        fields = set(request.model_fields)
        assert fields - set(REQUEST_FIELDS) <= RESOLVED_BY_GATEWAY, request.__name__
        expected = set(REQUEST_FIELDS) if request.__name__.startswith("Img2Img") else set(REQUEST_FIELDS) - IMG2IMG_ONLY
        assert expected <= fields, request.__name__
    assert set(REQUEST_FIELDS) <= set(GenerationPayload.model_fields)


@pytest.mark.parametrize("kind", [JobKind.TXT2IMG, JobKind.IMG2IMG])
def test_request_to_payload_to_row_keeps_every_value(kind: JobKind) -> None:
    body = {"prompt": "a red cube", "negative_prompt": "blur", "n": 2, "steps": 12, "guidance_scale": 3.5,
            "eta": 0.5, "quality": 70, "output_format": "webp", "priority": "low", "metadata": {"k": [1]}}
    schemas = build_schemas(Settings())
    if kind is JobKind.IMG2IMG:
        data = schemas.Img2ImgRequest.model_validate({**body, "strength": 0.5, "image": "x"}).model_dump()
    else:
        data = schemas.Txt2ImgRequest.model_validate(body).model_dump()
    p = GenerationPayload.from_request(
        data, job_id=new_job_id(), kind=kind, model="m", width=64, height=128, seeds=[7, 8],
        webhook=None, owner=None, created_at=1.0,
    )
    for name in REQUEST_FIELDS:
        assert getattr(p, name) == data.get(name, 1.0), name  # strength: 1 (all steps) unless img2img
    assert (p.width, p.height, p.seeds, p.model) == (64, 128, [7, 8], "m")
    row = GenerationRow(**p.row_kwargs(), seed=p.seeds[1])
    assert row == GenerationRow("a red cube", 8, "blur", 12, 3.5, 0.5, strength=data.get("strength", 1.0))


# ------------------------------------------------------------------------------------------ one source of limits


def test_settings_guidance_limit_cannot_exceed_the_models() -> None:
    with pytest.raises(ValueError, match="max_guidance_scale"):
        Settings(max_guidance_scale=GUIDANCE_SCALE_MAX + 1)
    schemas = build_schemas(Settings())
    assert schemas.Txt2ImgRequest.model_json_schema()["properties"]["seed"]["anyOf"][0]["maximum"] == SEED_MAX


@pytest.fixture(scope="module")
def sd64(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    """An SD-shaped tiny model with four UNet levels: sizes in multiples of 64."""
    config = dataclasses.replace(
        TINY_SD1, image_size=16, unet=dataclasses.replace(TINY_SD1.unet, channel_mult=(1, 1, 1, 1))
    )
    path = write_original_checkpoint(config, tmp_path_factory.mktemp("sd64") / "sd64.safetensors",
                                     fmt="safetensors")
    return load_pipeline(path, core_workers=1)


def test_the_model_refuses_what_the_shared_limits_refuse(sd64: LatentDiffusionPipeline) -> None:
    with pytest.raises(InvalidInput, match=f"seed: must be an integer in \\[0, {SEED_MAX}\\]"):
        sd64.validate_row(GenerationRow("x", SEED_MAX + 1, steps=2), 128, 128)
    with pytest.raises(InvalidInput, match="guidance_scale: must be in \\[0, 50\\]"):
        sd64.validate_row(GenerationRow("x", 1, steps=2, guidance_scale=GUIDANCE_SCALE_MAX + 0.5), 128, 128)
    sd64.validate_row(GenerationRow("x", SEED_MAX, steps=2, guidance_scale=GUIDANCE_SCALE_MAX), 128, 128)


# ------------------------------------------------------------------------------------------ advertised constraints


def test_an_sd_shaped_worker_advertises_its_real_limits(sd64: LatentDiffusionPipeline) -> None:
    c = model_constraints_of(sd64, Settings(max_steps=150))
    assert c is not None
    assert (c.size_multiple, c.min_side, c.max_width) == (64, 128, 256)  # default 128 px, 2x
    assert c.max_steps == 1000 and c.timestep_spacing == "uniform" and c.prediction_type == "eps"
    assert {3, 9, 27, 36, 37, *range(101, 112)} == set(c.refused_steps)  # 'uniform' over 1000 timesteps
    assert c.kinds == [JobKind.TXT2IMG, JobKind.INPAINT, JobKind.IMG2IMG] and c.max_prompt_tokens == sd64.max_prompt_tokens
    assert (c.min_guidance_scale, c.max_guidance_scale) == (0.0, GUIDANCE_SCALE_MAX)
    for steps in c.refused_steps:  # what the gateway refuses, the model refuses, and nothing else
        with pytest.raises(InvalidInput, match="steps"):
            sd64.validate_row(GenerationRow("x", 1, steps=steps), 128, 128)
    sd64.validate_row(GenerationRow("x", 1, steps=150), 128, 128)
    with pytest.raises(InvalidInput, match="width: must be a multiple of 64"):
        sd64.validate_row(GenerationRow("x", 1, steps=2), 520, 128)


def test_the_advertised_constraints_refuse_what_the_model_would(sd64: LatentDiffusionPipeline) -> None:
    c = [model_constraints_of(sd64, Settings())]
    with pytest.raises(InvalidInput) as exc:
        check_request("sd64", c, payload(width=520, height=128))
    assert exc.value.field == "width" and "multiple of 64" in str(exc.value)
    with pytest.raises(InvalidInput) as exc:
        check_request("sd64", c, payload(width=128, height=128, steps=9))
    assert exc.value.field == "steps" and "'uniform'" in str(exc.value) and "3, 9, 27, 36-37" in str(exc.value)
    check_request("sd64", c, payload(width=128, height=192, steps=10))


@pytest.mark.parametrize("family", ["sd1-inpaint", "ldm-class"])
def test_inpainting_and_class_conditional_models_advertise_their_kinds(family: str, tmp_path: Path) -> None:
    config = {"sd1-inpaint": TINY_SD1_INPAINT, "ldm-class": TINY_LDM_CLASS}[family]
    pipe = load_pipeline(write_original_checkpoint(config, tmp_path / f"{family}.ckpt"), core_workers=1)
    c = [model_constraints_of(pipe, Settings())]
    size = pipe.default_size
    if family == "sd1-inpaint":
        assert c[0].kinds == [JobKind.INPAINT]
        with pytest.raises(InvalidInput) as exc:
            check_request(family, c, payload(width=size, height=size))
        assert exc.value.field == "image" and "inpainting model" in str(exc.value)
        with pytest.raises(InvalidInput, match="image"):  # the model agrees
            pipe.validate_row(GenerationRow("x", 1, steps=2), size, size)
        with pytest.raises(InvalidInput) as exc:  # and no img2img: its UNet needs a mask
            check_request(family, c, payload(width=size, height=size, kind=JobKind.IMG2IMG, strength=0.5))
        assert exc.value.field == "image" and "/v1/inpaint" in str(exc.value)
    else:
        assert c[0].n_classes == pipe.n_classes
        with pytest.raises(InvalidInput) as exc:
            check_request(family, c, payload(width=size, height=size, prompt="a cat"))
        assert exc.value.field == "prompt" and "class id" in str(exc.value)
        check_request(family, c, payload(width=size, height=size, prompt="3", guidance_scale=1.0))


def test_check_request_over_several_workers_and_old_ones() -> None:
    s = Settings()
    plain = model_constraints(64, 8, s, refused_steps=[3])
    uncond = model_constraints(64, 16, s, guidance_range=(1.0, 1.0), refused_steps=[9], kinds=["txt2img"])
    check_request("m", [], payload(steps=3, guidance_scale=49.0))  # nobody advertises: settings only
    check_request("m", [plain], payload(guidance_scale=7.0))
    for p, field, text in [
        (payload(steps=9), "steps", "refused step counts: 3, 9"),
        (payload(guidance_scale=7.0), "guidance_scale", "must be 1 for model 'm'"),
        (payload(kind=JobKind.INPAINT, guidance_scale=1.0), "image", "does not run inpainting"),
        (payload(width=72, guidance_scale=1.0), "width", "multiple of 16"),
    ]:
        with pytest.raises(InvalidInput) as exc:
            check_request("m", [plain, uncond], p)
        assert exc.value.field == field and text in str(exc.value), str(exc.value)
    # a worker of an older version advertises sizes only: its heartbeat still parses and checks sizes only
    old = WorkerInfo.model_validate({"name": "w", "model": "m", "max_batch_rows": 4, "pid": 1, "host": "h",
                                     "started_at": 0.0, "constraints": {"size_multiple": 8, "min_side": 16,
                                                                        "max_width": 128, "max_height": 128}})
    assert old.constraints == ModelConstraints(size_multiple=8, min_side=16, max_width=128, max_height=128)
    check_request("m", [old.constraints], payload(steps=3, guidance_scale=49.0))


def test_format_ranges() -> None:
    assert format_ranges([3, 9, 27, 36, 37, 101, 102, 103]) == "3, 9, 27, 36-37, 101-103"
    assert format_ranges([]) == ""
