"""Turn model files on disk into configured, strictly loaded, inference-ready components.

:func:`load_model` accepts

* an original checkpoint (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``)
  with its config given explicitly (a :class:`~ldm.config.ModelConfig`, a YAML path
  or an already-parsed YAML mapping), or found as ``<checkpoint stem>.yaml`` beside
  the file, or else inferred from the tensor shapes (:mod:`ldm.loading.detect`);
* a diffusers-format folder (``model_index.json`` + ``unet/`` ``vae/`` ...),
  converted to the original layout by :mod:`ldm.loading.diffusers_format`.

A checkpoint whose text encoder was pruned takes it from elsewhere with
``text_encoder=`` (a diffusers ``text_encoder/`` folder or a file, see
:mod:`ldm.loading.text_encoder`).

Every component is loaded strictly (:func:`ldm.loading.checkpoint.load_component_strict`):
a checkpoint that does not fit the configured architecture raises
:class:`~ldm_serve.errors.CheckpointError` listing the offending tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.autoencoder import build_first_stage
from ldm.config import BERTEmbedderConfig, CLIPTextConfig, CondStageConfig, ModelConfig
from ldm.encoders import build_cond_stage_model, openclip_to_clip_state_dict
from ldm.loading.checkpoint import (
    DEFAULT_IGNORED_KEYS,
    CheckpointComponents,
    load_component_strict,
    read_state_dict,
    split_components,
)
from ldm.loading.config_yaml import model_config_from_yaml
from ldm.loading.detect import infer_model_config, normalize_prediction_type
from ldm.loading.diffusers_format import is_diffusers_folder, read_diffusers_folder
from ldm.loading.text_encoder import TextEncoderWeights, attach_text_encoder, read_text_encoder
from ldm.noise_schedule import alphas_cumprod as alphas_cumprod_of
from ldm.noise_schedule import make_beta_schedule
from ldm.tokenizers import TextTokenizer, load_tokenizer
from ldm.unet import UNetModel
from ldm_serve.errors import CheckpointError, ConfigError, TokenizerFilesMissing

__all__ = [
    "LoadedModel",
    "build_cond_stage",
    "cond_stage_state_dict",
    "load_model",
    "load_tokenizer_for",
    "model_alphas_cumprod",
    "resolve_config",
]

ConfigSource = ModelConfig | str | Path | Mapping[str, Any] | None

# |alphas_cumprod(config) - alphas_cumprod(checkpoint)| above this means the config is not the checkpoint's.
_SCHEDULE_ATOL = 1e-5


@dataclass
class LoadedModel:
    """A model ready for sampling.

    Attributes:
        config: the configuration the modules were built from.
        unet: the denoiser, eval mode, ``requires_grad=False``, on the requested device/dtype.
        first_stage: ``AutoencoderKL`` or ``VQModel``, likewise.
        cond_stage: the text / class encoder, or ``None`` (unconditional, LDM inpainting).
        tokenizer: the text tokenizer, or ``None`` (class / no conditioning).
        alphas_cumprod: ``[T]`` float32 on the CPU, from the config's schedule.
        scale_factor: latent scale ``z = scale_factor * E(x)``: the checkpoint's stored
            ``scale_factor`` buffer when present, else the config's.
        source: where the weights came from.
        used_ema: whether the UNet holds the checkpoint's EMA weights.
        global_step: the training step recorded in the checkpoint, if any.
    """

    config: ModelConfig
    unet: UNetModel
    first_stage: nn.Module
    cond_stage: nn.Module | None
    tokenizer: TextTokenizer | None
    alphas_cumprod: torch.Tensor
    scale_factor: float
    source: str
    used_ema: bool = False
    global_step: int | None = None


def resolve_config(
    config: ConfigSource,
    checkpoint_path: Path,
    sd: Mapping[str, torch.Tensor],
    prediction_type: str | None = None,
    text_config: CLIPTextConfig | None = None,
) -> ModelConfig:
    """The config to build: explicit, else ``<stem>.yaml`` beside the file, else inferred.

    ``prediction_type`` (``eps``/``epsilon``/``v``/``v_prediction``) overrides the
    parameterization of whichever config is chosen. ``text_config`` (a separately given
    text encoder's own configuration) replaces the config's CLIP text encoder of the same
    width, or guides the inference.
    """
    pred = normalize_prediction_type(prediction_type)
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is not None:
        cfg = model_config_from_yaml(config)
    else:
        sibling = next(
            (
                p
                for p in (checkpoint_path.with_suffix(".yaml"), checkpoint_path.with_suffix(".yml"))
                if p.is_file()
            ),
            None,
        )
        if sibling is None:
            return infer_model_config(sd, prediction_type=pred, text_config=text_config)
        cfg = model_config_from_yaml(sibling)
    if text_config is not None:
        cfg = _with_text_config(cfg, text_config)
    return dataclasses.replace(cfg, parameterization=pred) if pred is not None else cfg


def _with_text_config(cfg: ModelConfig, text_config: CLIPTextConfig) -> ModelConfig:
    """``cfg`` with a separately given encoder's config (the same encoder, stated by its own file)."""
    current = cfg.cond_stage
    if not isinstance(current, CLIPTextConfig) or current.hidden_size != text_config.hidden_size:
        width = current.hidden_size if isinstance(current, CLIPTextConfig) else None
        raise ConfigError(
            f"the separately given text encoder is a {text_config.hidden_size}-wide CLIP, but the "
            f"{cfg.family} config's conditioning encoder is {type(current).__name__ if current else 'none'}"
            + (f" of width {width}" if width is not None else "")
        )
    return dataclasses.replace(cfg, cond_stage=text_config)


def build_cond_stage(config: CondStageConfig | None) -> nn.Module | None:
    """The conditioning encoder module for ``config`` (``None`` for none)."""
    return None if config is None else build_cond_stage_model(config)


def cond_stage_state_dict(
    sd: Mapping[str, torch.Tensor], config: CondStageConfig | None
) -> dict[str, torch.Tensor]:
    """Bring ``cond_stage_model.*`` weights (prefix stripped) into the encoder module's key layout.

    SD 1.x CLIP keys lose their ``transformer.`` level; SD 2.x OpenCLIP keys
    (``model.*``) are converted to CLIP names. BERT / class keys are already in layout.
    """
    if not isinstance(config, CLIPTextConfig):
        return dict(sd)
    if any(k.startswith("model.") for k in sd):
        openclip = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        rest = {k: v for k, v in sd.items() if not k.startswith("model.")}
        return {**openclip_to_clip_state_dict(openclip, config.num_hidden_layers), **rest}
    return {k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in sd.items()}


def model_alphas_cumprod(config: ModelConfig) -> torch.Tensor:
    """``[T]`` float32 ``alphā_t`` of the config's training schedule."""
    betas = make_beta_schedule(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end)
    return alphas_cumprod_of(betas)


def _check_schedule(config: ModelConfig, computed: torch.Tensor, buffers: Mapping[str, torch.Tensor]) -> None:
    stored = buffers.get("alphas_cumprod")
    if stored is None:
        return
    stored = stored.detach().to(torch.float32).flatten()
    if stored.shape != computed.shape or not torch.allclose(stored, computed, rtol=0.0, atol=_SCHEDULE_ATOL):
        diff = (
            f"max |difference| {float((stored - computed).abs().max()):.3g}"
            if stored.shape == computed.shape
            else f"{stored.numel()} vs {computed.numel()} steps"
        )
        raise ConfigError(
            f"the config's noise schedule ({config.beta_schedule} {config.linear_start}-{config.linear_end}, "
            f"T={config.timesteps}) does not match the alphas_cumprod stored in the checkpoint ({diff}); "
            "the config does not belong to this checkpoint"
        )


def load_tokenizer_for(config: ModelConfig, directory: Path) -> TextTokenizer | None:
    """The tokenizer the cond stage needs, read from ``directory`` (``None`` if it needs none).

    Raises:
        TokenizerFilesMissing: naming the files expected in ``directory``.
        ConfigError: the tokenizer can emit ids beyond the encoder's embedding table.
    """
    cond = config.cond_stage
    if isinstance(cond, CLIPTextConfig):
        kind, kwargs, rows = (
            "clip",
            {"max_length": cond.max_position_embeddings, "pad_token": cond.pad_token},
            cond.vocab_size,
        )
    elif isinstance(cond, BERTEmbedderConfig) and cond.use_tokenizer:
        kind, kwargs, rows = "bert", {"max_length": cond.max_seq_len}, cond.vocab_size
    else:
        return None
    expected = "vocab.json and merges.txt" if kind == "clip" else "vocab.txt"
    try:
        tokenizer = load_tokenizer(directory, kind, **kwargs)  # type: ignore[arg-type]
    except TokenizerFilesMissing as exc:
        raise TokenizerFilesMissing(
            f"{exc}. The {config.family} {kind.upper()} tokenizer needs {expected} in {directory}; "
            "put them there or pass tokenizer_dir"
        ) from None
    if tokenizer.vocab_size > rows:
        raise ConfigError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the text encoder embeds only {rows}"
        )
    return tokenizer


def _check_first_stage_copy(cond: Mapping[str, torch.Tensor], first: Mapping[str, torch.Tensor]) -> None:
    """LDM inpainting saves ``cond_stage_model = first_stage_model`` twice; accept only that copy."""
    odd = sorted(k for k, v in cond.items() if k not in first or first[k].shape != v.shape)
    if odd:
        raise CheckpointError(
            "cond_stage weights found for a model without a conditioning encoder", unexpected=odd
        )


def _finish(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def _unet_keys(config: ModelConfig) -> list[str]:
    """The UNet's state-dict keys, from a parameter-free build on the meta device."""
    with torch.device("meta"):
        return list(UNetModel(config.unet).state_dict())


@dataclass
class _Source:
    """What a path yields before any module is built: config, weights per component."""

    config: ModelConfig
    parts: CheckpointComponents
    cond_stage: dict[str, torch.Tensor]  # in the encoder module's key layout
    tokenizer_dir: Path


def _open_folder(
    path: Path,
    config: ConfigSource,
    use_ema: bool | None,
    prediction_type: str | None,
    text_encoder: TextEncoderWeights | None,
) -> _Source:
    if not is_diffusers_folder(path):
        raise CheckpointError(f"{path} is a directory without model_index.json (not a diffusers folder)")
    if text_encoder is not None:
        raise ConfigError(
            f"the diffusers folder {path} has its own text_encoder/; a separate text encoder "
            f"({text_encoder.source}) is only for single-file checkpoints without one"
        )
    if use_ema:
        raise CheckpointError(f"use_ema=True but the diffusers folder {path} holds no EMA weights")
    folder = read_diffusers_folder(path, prediction_type=prediction_type)
    cfg = folder.config if config is None else resolve_config(config, path, {}, prediction_type)
    parts = CheckpointComponents(
        unet=folder.unet, first_stage=folder.first_stage, cond_stage=folder.cond_stage
    )
    return _Source(cfg, parts, folder.cond_stage, folder.tokenizer_dir)


def _open_checkpoint(
    path: Path,
    config: ConfigSource,
    use_ema: bool | None,
    prediction_type: str | None,
    text_encoder: TextEncoderWeights | None,
) -> _Source:
    sd = read_state_dict(path)
    if text_encoder is not None:
        sd = attach_text_encoder(sd, text_encoder, path)
    cfg = resolve_config(config, path, sd, prediction_type, None if text_encoder is None else text_encoder.config)
    parts = split_components(sd, use_ema, unet_keys=_unet_keys(cfg))
    if parts.unexpected:
        raise CheckpointError(
            f"{path} holds weights outside the UNet / first stage / cond stage of a {cfg.family} model",
            unexpected=parts.unexpected,
        )
    _check_schedule(cfg, model_alphas_cumprod(cfg), parts.buffers)
    cond_sd = cond_stage_state_dict(parts.cond_stage, cfg.cond_stage)
    if isinstance(cfg.cond_stage, CLIPTextConfig) and not cond_sd:
        raise CheckpointError(
            f"{path} holds no weights of the {cfg.family} text encoder (cond_stage_model.* pruned?); "
            "give it separately: text_encoder=PATH (CLI --text-encoder), a diffusers text_encoder/ "
            "folder or a file with the cond_stage_model.* weights"
        )
    if cfg.cond_stage is None and cond_sd:
        if cfg.inpaint_mode != "ldm":
            raise CheckpointError(
                f"{path} has cond_stage_model weights but the {cfg.family} config has no conditioning encoder",
                unexpected=sorted(cond_sd),
            )
        _check_first_stage_copy(cond_sd, parts.first_stage)
    tokenizer_dir = path.parent / "tokenizer"
    if text_encoder is not None and not tokenizer_dir.is_dir():
        # a diffusers text_encoder/ folder has its tokenizer/ beside it
        beside = Path(text_encoder.source).parent / "tokenizer"
        tokenizer_dir = beside if beside.is_dir() else tokenizer_dir
    return _Source(cfg, parts, cond_sd, tokenizer_dir)


def _scale_factor(source: _Source, path: Path) -> float:
    stored = source.parts.buffers.get("scale_factor")
    if stored is not None:
        return float(stored)
    if source.config.scale_by_std:
        raise CheckpointError(f"the config sets scale_by_std but {path} stores no scale_factor buffer")
    return source.config.scale_factor


def load_model(
    path: str | Path,
    config: ConfigSource = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    prediction_type: str | None = None,
    text_encoder: str | Path | None = None,
) -> LoadedModel:
    """Load a model for inference.

    Args:
        path: an original checkpoint file or a diffusers-format folder.
        config: a ``ModelConfig``, a YAML path or a parsed YAML mapping. Default: the
            ``.yaml`` with the checkpoint's stem beside it, else shape inference (a
            diffusers folder brings its own config).
        device: where the modules go.
        dtype: floating-point dtype of the modules' weights.
        use_ema: ``None`` = the EMA UNet weights when the checkpoint has them, else the
            raw ones; ``True`` / ``False`` = require EMA / raw weights.
        tokenizer_dir: tokenizer files (``vocab.json`` + ``merges.txt`` for CLIP,
            ``vocab.txt`` for BERT). Default: ``tokenizer/`` beside the checkpoint, or
            inside the diffusers folder.
        prediction_type: ``eps`` / ``v`` (diffusers spellings accepted); overrides the config.
        text_encoder: the text encoder of a checkpoint pruned of it: a diffusers
            ``text_encoder/`` folder, a file of ``cond_stage_model.*`` tensors, or a
            ``CLIPTextModel`` file with its ``config.json`` (:mod:`ldm.loading.text_encoder`).
            Refused when the checkpoint has an encoder of its own.

    Raises:
        CheckpointError: unreadable or unsafe file, weights not matching the architecture,
            requested EMA / raw weights absent.
        ConfigError: bad or unsupported config, unknown architecture, config whose noise
            schedule contradicts the checkpoint's.
        TokenizerFilesMissing: the tokenizer files are not where expected.
    """
    path = Path(path)
    device = torch.device(device)
    opener = _open_folder if path.is_dir() else _open_checkpoint
    separate = None if text_encoder is None else read_text_encoder(text_encoder)
    source = opener(path, config, use_ema, prediction_type, separate)
    cfg, parts = source.config, source.parts
    scale_factor = _scale_factor(source, path)

    unet = UNetModel(cfg.unet)
    first_stage = build_first_stage(cfg.first_stage)
    cond_stage = build_cond_stage(cfg.cond_stage)
    for module, weights, name in (
        (unet, parts.unet, "unet"),
        (first_stage, parts.first_stage, "first_stage"),
        (cond_stage, source.cond_stage, "cond_stage"),
    ):
        if module is None:
            continue
        module.to(dtype=dtype)
        load_component_strict(module, weights, name, DEFAULT_IGNORED_KEYS[name])
        _finish(module, device, dtype)

    tokenizer = load_tokenizer_for(
        cfg, Path(tokenizer_dir) if tokenizer_dir is not None else source.tokenizer_dir
    )
    return LoadedModel(
        config=cfg,
        unet=unet,
        first_stage=first_stage,
        cond_stage=cond_stage,
        tokenizer=tokenizer,
        alphas_cumprod=model_alphas_cumprod(cfg),
        scale_factor=scale_factor,
        source=str(path),
        used_ema=parts.used_ema,
        global_step=parts.global_step,
    )
