"""Image-to-image (SDEdit) in the pipeline: schedule tail, start latent, batch invariance, validation."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.noise_schedule import ddim_timesteps, img2img_timesteps
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from ldm.sampling.ddim import noised_latent
from ldm_serve.errors import InvalidInput
from ldm_serve.limits import img2img_steps
from tests.checkpoints import TINY_SD1, TINY_SD1_INPAINT, write_original_checkpoint
from tests.unit.test_pipeline import box_mask, scene

SIZE = 32


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    return load_pipeline(write_original_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "sd1.ckpt"))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    return load_pipeline(write_random_model(tmp_path_factory.mktemp("random")))


@pytest.mark.parametrize(("steps", "strength", "expected"), [(50, 0.75, 37), (20, 1.0, 20), (10, 0.3, 3), (4, 0.25, 1)])
def test_schedule_tail_is_int_of_steps_times_strength(steps: int, strength: float, expected: int) -> None:
    full = ddim_timesteps(steps)
    tail = img2img_timesteps(full, strength)
    assert img2img_steps(steps, strength) == expected == tail.numel()
    assert torch.equal(tail, full[steps - expected :])


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.01, math.nan, 0.05])
def test_strength_outside_the_range_or_running_no_step_is_refused(strength: float) -> None:
    with pytest.raises(InvalidInput) as info:
        img2img_timesteps(ddim_timesteps(10), strength)
    assert info.value.field == "strength"


def test_start_latent_is_the_posterior_sample_noised_with_x_T(sd1: LatentDiffusionPipeline) -> None:
    row = GenerationRow("a cat", 3, steps=10, image=scene(SIZE), strength=0.6)
    ts = sd1.row_timesteps(row)
    assert ts.tolist() == ddim_timesteps(10)[4:].tolist()
    got = sd1.start_latent(row, torch.Generator().manual_seed(3), (4, 4), ts)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((4, 4, 4), generator=g)  # the row's first draw, as for text-to-image
    z0 = sd1._encode_latent(sd1._image_tensor(row.image) * 2 - 1, g)[0]  # then the posterior sample
    abar = sd1.model.alphas_cumprod.double()[int(ts[0])]
    assert torch.allclose(got, abar.sqrt().float() * z0 + (1 - abar).sqrt().float() * x_T, atol=1e-6)
    assert torch.equal(got, noised_latent(z0, x_T, int(ts[0]), sd1.model.alphas_cumprod))


def test_rows_of_different_strengths_are_bit_identical_alone_and_batched(sd1: LatentDiffusionPipeline) -> None:
    target = GenerationRow("a red cat", 11, "dog", steps=10, guidance_scale=5.0, image=scene(SIZE, 1), strength=0.5)
    mates = [
        GenerationRow("the moon", 3, steps=10, guidance_scale=7.5, eta=0.5, image=scene(SIZE, 2), strength=0.9),
        GenerationRow("blue house", 99, steps=4, guidance_scale=1.0),
        GenerationRow("a hole", 5, steps=6, guidance_scale=2.0, image=scene(SIZE, 3), mask=box_mask(SIZE)),
        GenerationRow("", 7, steps=20, guidance_scale=2.0, eta=1.0, image=scene(SIZE, 4), strength=0.2),
    ]
    alone, _ = sd1.generate_latents([target], SIZE, SIZE)
    batched, _ = sd1.generate_latents([mates[0], target, *mates[1:]], SIZE, SIZE)
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[1])


def test_progress_counts_the_steps_that_run_and_inputs_matter(random_model: LatentDiffusionPipeline) -> None:
    rows = [
        GenerationRow("a", 1, steps=10, image=scene(SIZE), strength=0.5),
        GenerationRow("a", 1, steps=10, image=scene(SIZE), strength=0.8),
        GenerationRow("a", 1, steps=10, image=scene(SIZE, 9), strength=0.5),
    ]
    totals: dict[int, set[int]] = {}

    def on_step(progress):
        for p in progress:
            totals.setdefault(p.row, set()).add(p.total)

    images = [np.asarray(im) for im in random_model.generate(rows, SIZE, SIZE, on_step=on_step)]
    assert totals == {0: {5}, 1: {8}, 2: {5}}
    assert [random_model.row_step_count(r) for r in rows] == [5, 8, 5]
    assert not np.array_equal(images[0], images[1])  # strength matters
    assert not np.array_equal(images[0], images[2])  # the init image matters
    again = random_model.img2img(scene(SIZE), "a", seeds=[1], steps=10, strength=0.5)
    assert np.array_equal(np.asarray(again.images[0]), images[0]) and again.images[0].size == (SIZE, SIZE)
    assert "img2img" in random_model.job_kinds


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (GenerationRow("a", 1, steps=10, strength=0.5), "strength"),  # strength without an init image
        (GenerationRow("a", 1, steps=10, image=scene(SIZE), mask=box_mask(SIZE), strength=0.5), "strength"),
        (GenerationRow("a", 1, steps=10, image=scene(SIZE), strength=0.05), "strength"),  # no step would run
        (GenerationRow("a", 1, steps=10, image=scene(SIZE), strength=0.0), "strength"),
        (GenerationRow("a", 1, steps=10, image=scene(64), strength=0.5), "image"),  # not the output size
        (GenerationRow("a", 1, steps=10, mask=box_mask(SIZE)), "image"),
    ],
)
def test_bad_img2img_rows_name_the_field(random_model: LatentDiffusionPipeline, row: GenerationRow, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        random_model.validate_row(row, SIZE, SIZE)
    assert info.value.field == field


def test_inpainting_unet_refuses_img2img(tmp_path: Path) -> None:
    pipe = load_pipeline(write_original_checkpoint(TINY_SD1_INPAINT, tmp_path / "inp.ckpt"))
    assert pipe.job_kinds == ("inpaint",)
    with pytest.raises(InvalidInput, match="inpainting model") as info:
        pipe.validate_row(GenerationRow("a", 1, steps=4, image=scene(SIZE)), SIZE, SIZE)
    assert info.value.field == "mask"


def test_cli_img2img_fits_the_image_and_names_a_bad_strength(tmp_path: Path) -> None:
    ckpt = write_random_model(tmp_path / "m")
    scene(48).crop((0, 0, 48, 40)).save(tmp_path / "in.png")
    base = [sys.executable, "-m", "launcher", "img2img", "--checkpoint", str(ckpt), "--image", str(tmp_path / "in.png"),
            "--prompt", "a red circle", "--steps", "4", "--seed", "3"]
    proc = subprocess.run([*base, "--strength", "0.5", "--width", "32", "--height", "32", "--out",
                           str(tmp_path / "out.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "out.png").size == (32, 32) and "seed=3" in proc.stdout
    proc = subprocess.run([*base, "--strength", "0.1", "--width", "32", "--height", "32", "--out",
                           str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "strength" in proc.stderr, proc.stderr


def test_payloads_of_other_kinds_serialise_as_before_img2img() -> None:
    from ldm_serve.contract import GenerationPayload, JobKind

    common = dict(job_id="j" * 26, model="m", prompt="p", n=1, width=64, height=64, steps=4, guidance_scale=1.0,
                  seeds=[1], created_at=1.0)
    plain = GenerationPayload(kind=JobKind.TXT2IMG, **common)
    assert "strength" not in plain.model_dump_json()  # a worker of the previous version still parses it
    i2i = GenerationPayload(kind=JobKind.IMG2IMG, strength=0.5, **common)
    assert GenerationPayload.model_validate_json(i2i.model_dump_json()) == i2i
    assert GenerationPayload.model_validate_json(plain.model_dump_json()) == plain
