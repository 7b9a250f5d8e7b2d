"""A real diffusers folder (``save_pretrained``) loads into our modules with identical outputs.

The reference models are random tiny ``diffusers.UNet2DConditionModel`` /
``AutoencoderKL`` and ``transformers.CLIPTextModel`` instances saved as a
Stable Diffusion pipeline folder; ``ldm.loading.loader.load_model`` converts them to the
original layout, and the two implementations must agree to float32 rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm.loading.loader import load_model
from ldm.tiny import randomize_weights_
from tests.tokenizer_files import write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

# SD 1.x style: conv proj_in, a fixed head count, OpenAI CLIP (quick GELU).
# SD 2.x inpainting style: linear proj_in, per-level head counts (fixed 32-channel heads),
# OpenCLIP-like GELU text tower, 9 input channels, v-prediction.
VARIANTS = {
    "sd1": {
        "in_channels": 4,
        "attention_head_dim": 2,
        "use_linear_projection": False,
        "hidden_act": "quick_gelu",
        "pad_token": "<|endoftext|>",
        "prediction_type": "epsilon",
    },
    "sd2-inpaint": {
        "in_channels": 9,
        "attention_head_dim": [1, 2, 2],
        "use_linear_projection": True,
        "hidden_act": "gelu",
        "pad_token": "!",
        "prediction_type": "v_prediction",
    },
}


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def _save_folder(tmp_path: Path, variant: dict) -> tuple[Path, dict]:
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=variant["in_channels"],
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=variant["attention_head_dim"],
        use_linear_projection=variant["use_linear_projection"],
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.13025,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=variant["hidden_act"],
        )
    )
    for seed, module in enumerate((unet, vae, text)):
        randomize_weights_(module, seed=seed)
    vocab_dir = write_clip_tokenizer(tmp_path / "vocab")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab_dir, pad_token=variant["pad_token"])
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=variant["prediction_type"],
    )
    pipeline_cls = (
        diffusers.StableDiffusionInpaintPipeline
        if variant["in_channels"] == 9
        else diffusers.StableDiffusionPipeline
    )
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    # Hub SD folders ship the BPE files next to tokenizer_config.json; recent
    # transformers only writes tokenizer.json, so put them where hub folders have them.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / "tokenizer" / name)
    return folder, {"unet": unet.eval(), "vae": vae.eval(), "text": text.eval(), "tokenizer": tokenizer}


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_diffusers_folder_matches_diffusers(tmp_path: Path, name: str) -> None:
    variant = VARIANTS[name]
    folder, ref = _save_folder(tmp_path, variant)
    model = load_model(folder)
    cfg = model.config

    assert cfg.family == name
    assert cfg.parameterization == ("v" if variant["prediction_type"] == "v_prediction" else "eps")
    assert model.scale_factor == pytest.approx(0.13025)
    assert cfg.inpaint_mode == ("sd" if variant["in_channels"] == 9 else None)
    ref_abar = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(model.alphas_cumprod, ref_abar.float(), rtol=0, atol=1e-6)

    # UNet: noise prediction at one timestep, 3 levels -> latent side divisible by 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, variant["in_channels"], 16, 16, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 7, 32, generator=gen)
    expected = ref["unet"](x, t, encoder_hidden_states=context).sample
    assert _rel_err(model.unet(x, t, context=context), expected) <= 1e-5

    # VAE decoder (post_quant_conv included on both sides)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    assert _rel_err(model.first_stage.decode(z), ref["vae"].decode(z).sample) <= 1e-5

    # Text encoder on the tokenizer's padded ids; the pad id comes from the folder's tokenizer files
    ids = model.tokenizer(["a photo of a cat", "an astronaut riding a horse on the moon"])
    assert model.tokenizer.pad_id == ref["tokenizer"].pad_token_id
    assert torch.equal(
        ids,
        ref["tokenizer"](
            ["a photo of a cat", "an astronaut riding a horse on the moon"],
            padding="max_length",
            max_length=77,
            return_tensors="pt",
        ).input_ids,
    )
    expected_text = ref["text"](ids).last_hidden_state
    assert _rel_err(model.cond_stage(ids), expected_text) <= 1e-5
