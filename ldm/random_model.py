"""A tiny, untrained, text-conditioned model in the original checkpoint layout.

Used by tests and by ``ldm-serve up`` when no trained model is available. It is a
real member of the family (KL autoencoder f=4, the UNet :data:`ldm.tiny.TINY_UNET`
with spatial transformers, LDM BERT text encoder) with random weights
(:mod:`ldm.tiny`), so it draws structured noise: every
place that shows it must say that it is untrained (``<stem>.json`` carries
``"untrained": true``, which :func:`ldm.pipeline.load_pipeline` reads).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.autoencoder import build_first_stage
from ldm.config import AutoencoderConfig, BERTEmbedderConfig, ModelConfig
from ldm.encoders import build_cond_stage_model
from ldm.loading.config_yaml import model_config_to_yaml
from ldm.tiny import TINY_UNET, randomize_unet_weights_, randomize_weights_
from ldm.unet import UNetModel

__all__ = ["RANDOM_MODEL_CONFIG", "write_random_model"]

_WORDS = (
    "a an the of on in at and with to left right top bottom center centre middle small big large "
    "red green blue yellow orange purple white black gray grey pink brown cyan "
    "circle square triangle star cross diamond ring background photo painting of cat dog house"
).split()

RANDOM_MODEL_CONFIG = ModelConfig(
    family="ldm-txt2img",
    unet=TINY_UNET,
    first_stage=AutoencoderConfig(
        kind="kl",
        embed_dim=4,
        z_channels=4,
        resolution=64,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        double_z=True,
    ),
    cond_stage=BERTEmbedderConfig(n_embed=32, n_layer=2, vocab_size=len(_WORDS) + 5 + 26 * 2, heads=4, dim_head=8),
    conditioning_key="crossattn",
    linear_start=0.00085,
    linear_end=0.012,
    scale_factor=1.0,
    image_size=16,
)


def _vocab() -> list[str]:
    letters = list(string.ascii_lowercase)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters, *("##" + c for c in letters)]


def write_random_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write ``random-untrained.safetensors`` + ``.yaml`` + ``.json`` + ``tokenizer/vocab.txt``.

    Returns the checkpoint path. The same seed always writes the same weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = RANDOM_MODEL_CONFIG
    parts: dict[str, nn.Module] = {
        "model.diffusion_model.": randomize_unet_weights_(UNetModel(cfg.unet), seed),
        "first_stage_model.": randomize_weights_(build_first_stage(cfg.first_stage), seed + 1),
        "cond_stage_model.": randomize_weights_(build_cond_stage_model(cfg.cond_stage), seed + 2),
    }
    state: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    ckpt = directory / "random-untrained.safetensors"
    save_file(state, str(ckpt))
    ckpt.with_suffix(".yaml").write_text(model_config_to_yaml(cfg))
    ckpt.with_suffix(".json").write_text(
        json.dumps({"name": "random-untrained", "untrained": True, "family": cfg.family}, indent=2)
    )
    tok = directory / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    return ckpt
