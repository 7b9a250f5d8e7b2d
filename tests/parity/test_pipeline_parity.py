"""End-to-end parity: our txt2img vs diffusers' StableDiffusionPipeline on the same checkpoint.

The tiny SD 1.x checkpoint is written in the original single-file layout, with
its original-style YAML. diffusers gets it through its own single-file
converters (reading that YAML), transformers' CLIPTextModel and CLIPTokenizer
read the same weights and tokenizer files, and the scheduler is
``DDIMScheduler`` configured to the original LDM semantics. Both sides start
from the same ``x_T``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ldm.pipeline import GenerationRow, load_pipeline
from tests.checkpoints import TINY_SD1, write_original_checkpoint

pytestmark = [pytest.mark.parity, pytest.mark.slow]

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

STEPS = 20
SCALE = 7.5
PROMPT = "a photo of a red cat riding a horse"
NEGATIVE = "blue dog"
SEED = 1234
SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_original_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "tiny-sd1.ckpt", seed=7)


def diffusers_pipeline(ckpt: Path):
    """A diffusers StableDiffusionPipeline built from our original-format file."""
    from safetensors.torch import load_file  # noqa: F401  (keeps the import graph explicit)

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    original = yaml.safe_load(ckpt.with_suffix(".yaml").read_text())

    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(original, state, image_size=SIZE)
    unet = diffusers.UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_cfg), strict=True)

    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(original, state, image_size=SIZE)
    vae = diffusers.AutoencoderKL(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_cfg), strict=True)

    text_cfg = TINY_SD1.cond_stage
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=text_cfg.vocab_size,
        hidden_size=text_cfg.hidden_size,
        intermediate_size=text_cfg.intermediate_size,
        num_hidden_layers=text_cfg.num_hidden_layers,
        num_attention_heads=text_cfg.num_attention_heads,
        max_position_embeddings=text_cfg.max_position_embeddings,
        hidden_act=text_cfg.hidden_act,
        layer_norm_eps=text_cfg.layer_norm_eps,
        bos_token_id=text_cfg.vocab_size - 2,
        eos_token_id=text_cfg.vocab_size - 1,
        pad_token_id=text_cfg.vocab_size - 1,
    )
    text = transformers.CLIPTextModel(clip_cfg)
    prefix = "cond_stage_model.transformer."
    text_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    text_state.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5 layout
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    missing, unexpected = text.load_state_dict(text_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    tokenizer = transformers.CLIPTokenizer(
        str(ckpt.parent / "tokenizer" / "vocab.json"), str(ckpt.parent / "tokenizer" / "merges.txt"), model_max_length=77
    )
    params = original["model"]["params"]
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=params["linear_start"],
        beta_end=params["linear_end"],
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_ddim_txt2img_latents_and_image_match_diffusers(checkpoint: Path) -> None:
    ours = load_pipeline(checkpoint)
    row = GenerationRow(PROMPT, SEED, NEGATIVE, steps=STEPS, guidance_scale=SCALE)
    latents, canceled = ours.generate_latents([row], SIZE, SIZE)
    assert not canceled
    image = np.asarray(ours.generate([row], SIZE, SIZE)[0], dtype=np.float32) / 255.0

    ref = diffusers_pipeline(checkpoint)
    # same x_T: the first draw of the row's generator
    x_T = torch.randn((4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))[None]
    with torch.no_grad():
        ref_latents = ref(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=SCALE,
            eta=0.0,
            latents=x_T.clone(),
            height=SIZE,
            width=SIZE,
            output_type="latent",
        ).images
        ref_image = ref.vae.decode(ref_latents / ref.vae.config.scaling_factor).sample
    ref_image = ((ref_image + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()

    assert rel_err(latents, ref_latents) <= 1e-4
    # the decoded image agrees to the uint8 rounding of ours
    assert np.abs(image - ref_image).max() <= 1.0 / 255.0 + 1e-4
    # and the run is not degenerate: the latents moved far from the start noise
    assert rel_err(latents, x_T) > 0.1


def test_text_conditioning_matches_transformers(checkpoint: Path) -> None:
    ours = load_pipeline(checkpoint)
    ref = diffusers_pipeline(checkpoint)
    ids = ref.tokenizer([PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref.text_encoder(ids.input_ids).last_hidden_state
    got = ours.encode_text([PROMPT, ""])
    assert rel_err(got, expected) <= 1e-5
