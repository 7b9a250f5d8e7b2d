"""End-to-end parity: our img2img vs diffusers' StableDiffusionImg2ImgPipeline on the same checkpoint.

The models are those of ``test_pipeline_parity.py`` (the tiny SD 1.x checkpoint in the
original layout; diffusers converts it with its own single-file converters) and the
scheduler is ``DDIMScheduler`` configured to the original LDM semantics. diffusers
encodes the init image with its own VAE; only the order of the random draws differs
(diffusers draws the posterior sample first, we draw ``x_T`` first, see ldm/pipeline.py),
so the test hands diffusers its own posterior latent built from our posterior draw, and
its noise is the first draw of the same seed, our ``x_T``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import GenerationRow, load_pipeline
from tests.checkpoints import TINY_SD1, write_original_checkpoint
from tests.parity.test_pipeline_parity import diffusers_pipeline, rel_err

pytestmark = [pytest.mark.parity, pytest.mark.slow]

diffusers = pytest.importorskip("diffusers")

STEPS = 20
SCALE = 7.5
PROMPT = "a photo of a red cat riding a horse"
NEGATIVE = "blue dog"
SEED = 4321
SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_original_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "tiny-sd1.ckpt", seed=7)


def init_image() -> Image.Image:
    rng = np.random.default_rng(3)
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(255, 0, SIZE, dtype=np.uint8)[:, None]
    arr[16:48, 16:48, 2] = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_latents_and_image_match_diffusers(checkpoint: Path, strength: float) -> None:
    ours = load_pipeline(checkpoint)
    image = init_image()
    row = GenerationRow(PROMPT, SEED, NEGATIVE, steps=STEPS, guidance_scale=SCALE, image=image, strength=strength)
    latents, canceled = ours.generate_latents([row], SIZE, SIZE)
    assert not canceled
    got_image = np.asarray(ours.generate([row], SIZE, SIZE)[0], dtype=np.float32) / 255.0

    ref = diffusers_pipeline(checkpoint)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    # the row's draws: x_T first (diffusers' add_noise noise), then the posterior sample's noise
    eps = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=_after_first_draw(SEED))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        posterior = ref.vae.encode(pixels).latent_dist
        z0 = ref.vae.config.scaling_factor * (posterior.mean + posterior.std * eps)
        ref_latents = img2img(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=z0,  # a 4-channel tensor is taken as the scaled init latent
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=SCALE,
            eta=0.0,
            generator=torch.Generator().manual_seed(SEED),  # its only draw: the noise, = x_T
            output_type="latent",
        ).images
        ref_image = ref.vae.decode(ref_latents / ref.vae.config.scaling_factor).sample
    ref_image = ((ref_image + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()

    # the same number of steps ran, from the same start
    assert ours.row_step_count(row) == int(STEPS * strength)
    ours_z0 = ours._encode_latent(ours._image_tensor(image) * 2 - 1, _after_first_draw(SEED))
    assert rel_err(ours_z0, z0) <= 1e-4  # the two encoders and posterior samples agree
    assert rel_err(latents, ref_latents) <= 1e-4
    assert np.abs(got_image - ref_image).max() <= 1.0 / 255.0 + 1e-4
    assert rel_err(latents, z0) > 0.1  # not degenerate: the latents moved away from the source


def _after_first_draw(seed: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    torch.randn((4, SIZE // 8, SIZE // 8), generator=gen)
    return gen
