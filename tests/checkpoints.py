"""Tiny model configs per family and a writer of original-layout checkpoints for tests.

``TINY_*`` are complete :class:`~ldm.config.ModelConfig` objects built from the
components in :mod:`tests.tiny`. Where a value cannot be seen in tensor shapes
(head counts, schedule, scale factor, training size) they follow the family's
released config exactly as :mod:`ldm.loading.detect` assumes it, so that
``infer_model_config`` on a written checkpoint reproduces them:

* CLIP text towers use 64-channel heads (ViT-L/14 and ViT-H-14 both do), so the
  tiny CLIP is 64 wide with one head;
* SD 1.x and LDM txt2img UNets use 8 heads, SD 2.x 64-channel heads (hence
  ``model_channels=64`` for the tiny SD 2), inpainting_big 8, cin256 1;
* BERT uses 8 heads;
* attention levels are listed deepest first, as detection returns them.

:func:`write_original_checkpoint` builds the modules, randomises them and writes
a file laid out like the released ``.ckpt`` files (Lightning ``state_dict``
nesting, root schedule buffers, CLIP ``position_ids``, OpenCLIP
``text_projection``/``logit_scale``, LDM inpainting's duplicate first stage under
``cond_stage_model.``, optional ``model_ema.*`` copies), plus the YAML and
tokenizer files the loader looks for beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ldm.autoencoder import build_first_stage
from ldm.config import BERTEmbedderConfig, CLIPTextConfig, ModelConfig
from ldm.encoders import build_cond_stage_model, clip_to_openclip_state_dict
from ldm.loading.checkpoint import ema_key
from ldm.loading.config_yaml import model_config_to_yaml
from ldm.noise_schedule import alphas_cumprod, make_beta_schedule
from ldm.tiny import randomize_weights_
from ldm.unet import UNetModel
from tests.tiny import (
    AE_KL_F8,
    AE_VQ_F4,
    AE_VQ_F4_NOATTN,
    BERT_TINY,
    CLASS_TINY,
    CLIP_TINY,
    UNET_CLASS,
    UNET_LDM_INPAINT,
    UNET_SD1,
    UNET_SD2,
)
from tests.tokenizer_files import write_bert_vocab, write_clip_tokenizer

__all__ = [
    "ALL_TINY",
    "TINY_BERT",
    "TINY_CLIP",
    "TINY_LDM_CLASS",
    "TINY_LDM_INPAINT",
    "TINY_LDM_TXT2IMG",
    "TINY_OPENCLIP",
    "TINY_SD1",
    "TINY_SD1_INPAINT",
    "TINY_SD2",
    "build_modules",
    "original_state_dict",
    "write_original_checkpoint",
]

replace = dataclasses.replace

TINY_CLIP = replace(CLIP_TINY, hidden_size=64, intermediate_size=128, num_attention_heads=1)
TINY_OPENCLIP = replace(TINY_CLIP, hidden_act="gelu", layer="penultimate", pad_token="!")
TINY_BERT = replace(BERT_TINY, heads=8, dim_head=4)

_SD = {"linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215, "use_ema": False}

TINY_SD1 = ModelConfig(
    family="sd1",
    unet=replace(UNET_SD1, num_heads=8, attention_resolutions=(2, 1), context_dim=64),
    first_stage=AE_KL_F8,
    cond_stage=TINY_CLIP,
    conditioning_key="crossattn",
    latent_channels=4,
    image_size=64,
    **_SD,
)
TINY_SD1_INPAINT = replace(
    TINY_SD1,
    family="sd1-inpaint",
    unet=replace(TINY_SD1.unet, in_channels=9),
    conditioning_key="hybrid",
    inpaint_mode="sd",
    use_ema=True,  # v1-inpainting-inference.yaml leaves LatentDiffusion's default
)
TINY_SD2 = ModelConfig(
    family="sd2",
    unet=replace(
        UNET_SD2, model_channels=64, num_head_channels=64, attention_resolutions=(2, 1), context_dim=64
    ),
    first_stage=AE_KL_F8,
    cond_stage=TINY_OPENCLIP,
    conditioning_key="crossattn",
    parameterization="v",
    latent_channels=4,
    image_size=96,
    **_SD,
)
TINY_LDM_TXT2IMG = ModelConfig(
    family="ldm-txt2img",
    unet=replace(UNET_SD1, num_heads=8, attention_resolutions=(2, 1), context_dim=TINY_BERT.n_embed),
    first_stage=AE_KL_F8,
    cond_stage=TINY_BERT,
    conditioning_key="crossattn",
    latent_channels=4,
    image_size=32,
    **_SD,
)
TINY_LDM_INPAINT = ModelConfig(
    family="ldm-inpaint",
    unet=replace(UNET_LDM_INPAINT, num_heads=8),
    first_stage=AE_VQ_F4_NOATTN,
    cond_stage=None,
    conditioning_key="concat",
    linear_start=0.0015,
    linear_end=0.0205,
    scale_factor=1.0,
    use_ema=True,
    inpaint_mode="ldm",
    latent_channels=3,
    image_size=64,
)
TINY_LDM_CLASS = ModelConfig(
    family="ldm-class",
    unet=UNET_CLASS,
    first_stage=AE_VQ_F4,
    cond_stage=CLASS_TINY,
    conditioning_key="crossattn",
    linear_start=0.0015,
    linear_end=0.0195,
    scale_factor=1.0,
    use_ema=False,
    latent_channels=3,
    image_size=64,
)

ALL_TINY: dict[str, ModelConfig] = {
    c.family: c
    for c in (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_LDM_TXT2IMG, TINY_LDM_INPAINT, TINY_LDM_CLASS)
}
"""Every tiny family config, keyed by family name."""


def build_modules(config: ModelConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Our modules for ``config`` with random weights (``unet``, ``first_stage``, ``cond_stage`` if any)."""
    modules: dict[str, torch.nn.Module] = {
        "unet": randomize_weights_(UNetModel(config.unet), seed=seed),
        "first_stage": randomize_weights_(build_first_stage(config.first_stage), seed=seed + 1),
    }
    if config.cond_stage is not None:
        modules["cond_stage"] = randomize_weights_(build_cond_stage_model(config.cond_stage), seed=seed + 2)
    return modules


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in sd.items()}


def _cond_stage_keys(config: ModelConfig, module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    cond = config.cond_stage
    if module is None:
        return {}
    sd = module.state_dict()
    if isinstance(cond, CLIPTextConfig) and cond.hidden_act == "gelu":
        # SD 2.x: FrozenOpenCLIPEmbedder keeps the OpenCLIP names (+ unused projection / temperature)
        width = cond.hidden_size
        out = _prefixed("cond_stage_model.model.", clip_to_openclip_state_dict(sd, cond.num_hidden_layers))
        out["cond_stage_model.model.text_projection"] = torch.randn(width, width)
        out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
        return out
    if isinstance(cond, CLIPTextConfig):
        out = _prefixed("cond_stage_model.transformer.", sd)
        # SD 1.x files carry the HF position_ids buffer, [1, 77] int64
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            cond.max_position_embeddings
        )[None]
        return out
    return _prefixed("cond_stage_model.", sd)


def original_state_dict(
    config: ModelConfig,
    *,
    seed: int = 0,
    ema: bool = False,
    ema_only: bool = False,
) -> dict[str, torch.Tensor]:
    """The flat original-layout state dict of a randomised model of ``config``.

    ``ema`` adds ``model_ema.*`` copies of the UNet with *different* values (seed + 100)
    plus ``model_ema.decay`` / ``num_updates``; ``ema_only`` keeps only those.
    """
    modules = build_modules(config, seed)
    sd: dict[str, torch.Tensor] = {}
    if not ema_only:
        sd.update(_prefixed("model.diffusion_model.", modules["unet"].state_dict()))
    if ema or ema_only:
        ema_unet = randomize_weights_(UNetModel(config.unet), seed=seed + 100)
        sd.update({ema_key(k): v.detach().clone() for k, v in ema_unet.state_dict().items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    first = modules["first_stage"].state_dict()
    sd.update(_prefixed("first_stage_model.", first))
    if config.inpaint_mode == "ldm":
        # cond_stage_model is first_stage_model in LDM inpainting; Lightning saves it twice
        sd.update(_prefixed("cond_stage_model.", first))
    sd.update(_cond_stage_keys(config, modules.get("cond_stage")))
    betas = make_beta_schedule(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end)
    abar = alphas_cumprod(betas)
    sd["betas"] = betas.to(torch.float32)
    sd["alphas_cumprod"] = abar
    sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1), abar[:-1]])
    sd["sqrt_alphas_cumprod"] = abar.sqrt()
    if config.scale_by_std:
        sd["scale_factor"] = torch.tensor(config.scale_factor)
    return sd


def write_original_checkpoint(
    config: ModelConfig,
    path: str | Path,
    *,
    fmt: str = "ckpt",
    seed: int = 0,
    ema: bool = False,
    ema_only: bool = False,
    nested: bool = True,
    yaml: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Write a randomised original-layout checkpoint of ``config`` and return its path.

    Args:
        config: what to build (e.g. a ``TINY_*`` config).
        path: the file to write; its suffix is replaced to match ``fmt``.
        fmt: ``"ckpt"`` (``torch.save``) or ``"safetensors"``.
        seed: weight seed (the same seed gives the same tensors in either format).
        ema / ema_only: add / keep only ``model_ema.*`` UNet weights.
        nested: ckpt only: wrap as a Lightning checkpoint
            (``{"state_dict": ..., "global_step": 4321, "epoch": 2}``).
        yaml: write ``<stem>.yaml`` beside the file (:func:`model_config_to_yaml`).
        tokenizer: write a ``tokenizer/`` folder beside the file (CLIP or BERT vocab).
    """
    if fmt not in ("ckpt", "safetensors"):
        raise ValueError(f"fmt must be 'ckpt' or 'safetensors', got {fmt!r}")
    out = Path(path).with_suffix(f".{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = original_state_dict(config, seed=seed, ema=ema, ema_only=ema_only)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out))
    else:
        torch.save({"state_dict": sd, "global_step": 4321, "epoch": 2} if nested else sd, out)
    if yaml:
        out.with_suffix(".yaml").write_text(model_config_to_yaml(config), encoding="utf-8")
    if tokenizer:
        if isinstance(config.cond_stage, CLIPTextConfig):
            write_clip_tokenizer(out.parent / "tokenizer")
        elif isinstance(config.cond_stage, BERTEmbedderConfig) and config.cond_stage.use_tokenizer:
            write_bert_vocab(out.parent / "tokenizer")
    return out
