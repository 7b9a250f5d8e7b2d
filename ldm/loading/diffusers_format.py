"""Read a diffusers-format Stable Diffusion folder into our config and original-layout weights.

A folder saved by ``StableDiffusionPipeline.save_pretrained`` (or downloaded from
a model hub in that layout) holds::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model[.fp16].{safetensors,bin}
    vae/config.json           vae/diffusion_pytorch_model[.fp16].{safetensors,bin}
    text_encoder/config.json  text_encoder/model[.fp16].safetensors | pytorch_model.bin
    tokenizer/vocab.json      tokenizer/merges.txt  (special_tokens_map.json)
    scheduler/scheduler_config.json

:func:`read_diffusers_folder` translates the three ``config.json`` files and the
scheduler config into a :class:`~ldm.config.ModelConfig` and renames the weights
into the original CompVis layout (the inverse of diffusers' single-file
conversion, see the reference notes §2.6), so that the same modules and the same
strict loader serve both formats. The CLIP text encoder needs no renaming: our
encoder uses ``transformers.CLIPTextModel`` key names.

Notation for the UNet: ``L`` levels, ``n = layers_per_block`` ResBlocks per level
on the way down and ``n + 1`` on the way up. diffusers ``down_blocks.b.resnets.j``
is ``input_blocks.{1 + b (n + 1) + j}.0``, its downsampler
``input_blocks.{(b + 1)(n + 1)}.0.op``; ``up_blocks.b.resnets.j`` is
``output_blocks.{b (n + 1) + j}.0`` and its upsampler sits after the attention
(``.2``) or in its place (``.1``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.config import AutoencoderConfig, CLIPTextConfig, ModelConfig, UNetConfig
from ldm.loading.checkpoint import read_state_dict
from ldm.loading.config_yaml import classify_family
from ldm.loading.detect import normalize_prediction_type
from ldm_serve.errors import CheckpointError, ConfigError

__all__ = [
    "DiffusersModel",
    "is_diffusers_folder",
    "pad_token_of",
    "read_diffusers_folder",
    "read_json",
    "text_config_from_transformers",
    "text_state_dict_from_transformers",
    "weights_file",
    "unet_config_from_diffusers",
    "unet_state_dict_from_diffusers",
    "vae_config_from_diffusers",
    "vae_state_dict_from_diffusers",
]


@dataclass
class DiffusersModel:
    """A diffusers folder translated to our config and original-layout state dicts.

    ``unet`` / ``first_stage`` / ``cond_stage`` use the keys of :class:`ldm.unet.UNetModel`,
    the first-stage model and :class:`ldm.encoders.clip.CLIPTextEncoder`.
    """

    config: ModelConfig
    unet: dict[str, torch.Tensor]
    first_stage: dict[str, torch.Tensor]
    cond_stage: dict[str, torch.Tensor]
    tokenizer_dir: Path


def is_diffusers_folder(path: str | Path) -> bool:
    """True when ``path`` is a directory with a ``model_index.json``."""
    return (Path(path) / "model_index.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def _check(cfg: Mapping[str, Any], where: str, key: str, allowed: tuple[Any, ...]) -> None:
    """Refuse an architecture option that we do not implement (absent = default, fine)."""
    if key in cfg and cfg[key] not in allowed:
        raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported (supported: {allowed})")


def _uniform(value: Any, where: str) -> int:
    """An int, or a list of ``count`` equal ints (diffusers allows per-block values)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}={list(value)}: per-block values are not supported")
        value = value[0]
    return int(value)


# --------------------------------------------------------------------------- configs

_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Translate ``unet/config.json`` (``UNet2DConditionModel``) to a :class:`UNetConfig`.

    ``attention_head_dim`` is, despite its name, a head *count* in diffusers
    (``num_attention_heads`` overrides it): an int (SD 1.x: 8) means that many
    heads everywhere, a per-level list (SD 2.x: [5, 10, 20, 20]) becomes the fixed
    head width ``channels / heads`` (64) when that is the same on every attention level.

    Raises:
        ConfigError: block types or options the original UNet cannot express.
    """
    where = "unet/config.json"
    for key, allowed in _UNET_FIXED.items():
        if key == "only_cross_attention" and isinstance(cfg.get(key), list) and not any(cfg[key]):
            continue
        _check(cfg, where, key, allowed)
    widths = [int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280))]
    levels = len(widths)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    if len(down) != levels or len(up) != levels:
        raise ConfigError(
            f"{where}: {levels} block_out_channels but {len(down)} down / {len(up)} up block types"
        )
    attn_levels = []
    for level, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        if d not in ("CrossAttnDownBlock2D", "DownBlock2D") or u not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise ConfigError(f"{where}: block types {d!r} / {u!r} are not supported")
        if (d == "CrossAttnDownBlock2D") != (u == "CrossAttnUpBlock2D"):
            raise ConfigError(f"{where}: level {level} has attention on one side of the UNet only")
        if d == "CrossAttnDownBlock2D":
            attn_levels.append(level)
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ConfigError(f"{where}: block_out_channels {widths} are not multiples of {mc}")

    heads_cfg = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = list(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else [heads_cfg] * levels
    if len(heads) != levels:
        raise ConfigError(f"{where}: {len(heads)} head counts for {levels} levels")
    used = sorted({*attn_levels, levels - 1})  # the middle block uses the deepest level's heads
    if len({int(heads[i]) for i in used}) == 1:
        num_heads, head_channels = int(heads[used[0]]), -1
    elif len({widths[i] // int(heads[i]) for i in used}) == 1 and all(
        widths[i] % int(heads[i]) == 0 for i in used
    ):
        num_heads, head_channels = -1, widths[used[0]] // int(heads[used[0]])
    else:
        raise ConfigError(f"{where}: head counts {heads} give neither a fixed count nor a fixed head width")

    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=_uniform(cfg.get("layers_per_block", 2), f"{where} layers_per_block"),
        attention_resolutions=tuple(sorted((2**level for level in attn_levels), reverse=True)),
        num_heads=num_heads,
        num_head_channels=head_channels,
        legacy=False,
        use_spatial_transformer=True,
        transformer_depth=_uniform(
            cfg.get("transformer_layers_per_block", 1), f"{where} transformer_layers_per_block"
        ),
        context_dim=_uniform(cfg.get("cross_attention_dim", 1280), f"{where} cross_attention_dim"),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
    )


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> AutoencoderConfig:
    """Translate ``vae/config.json`` (``AutoencoderKL``) to an :class:`AutoencoderConfig`.

    Raises:
        ConfigError: block types or options the original autoencoder cannot express.
    """
    where = "vae/config.json"
    for key, allowed in {
        "act_fn": ("silu",),
        "norm_num_groups": (32,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "shift_factor": (None, 0, 0.0),
        "latents_mean": (None,),
        "latents_std": (None,),
    }.items():
        _check(cfg, where, key, allowed)
    widths = [int(c) for c in cfg.get("block_out_channels", (64,))]
    down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(widths):
        raise ConfigError(
            f"{where}: block types {down} / {up} are not supported (plain encoder / decoder blocks only)"
        )
    ch = widths[0]
    latent = int(cfg.get("latent_channels", 4))
    return AutoencoderConfig(
        kind="kl",
        embed_dim=latent,
        z_channels=latent,
        resolution=256,
        in_channels=int(cfg.get("in_channels", 3)),
        out_ch=int(cfg.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=int(cfg.get("layers_per_block", 1)),
        attn_resolutions=(),
        double_z=True,
        attn_type="vanilla" if cfg.get("mid_block_add_attention", True) else "none",
    )


def text_config_from_transformers(cfg: Mapping[str, Any], pad_token: str | None) -> CLIPTextConfig:
    """Our :class:`CLIPTextConfig` from a ``CLIPTextModel`` ``config.json`` (and the tokenizer's pad token)."""
    where = "text_encoder/config.json"
    architectures = cfg.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise ConfigError(f"{where}: text encoder {architectures} is not supported (CLIPTextModel only)")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported")
    return CLIPTextConfig(
        vocab_size=int(cfg.get("vocab_size", 49408)),
        hidden_size=int(cfg.get("hidden_size", 512)),
        intermediate_size=int(cfg.get("intermediate_size", 2048)),
        num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
        num_attention_heads=int(cfg.get("num_attention_heads", 8)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
        hidden_act=act,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        layer="last",  # SD 2.x folders drop the last layer instead of skipping it
        pad_token=pad_token or ("!" if act == "gelu" else "<|endoftext|>"),
    )


def pad_token_of(tokenizer_dir: Path) -> str | None:
    """The pad token from ``special_tokens_map.json`` (right for SD 2.x, unlike ``tokenizer_config.json``)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            pad = read_json(path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}


def _schedule(cfg: Mapping[str, Any]) -> dict[str, Any]:
    where = "scheduler/scheduler_config.json"
    if cfg.get("trained_betas") is not None:
        raise ConfigError(f"{where}: explicit trained_betas are not supported")
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError(
            f"{where}: rescale_betas_zero_snr is not supported (the original schedules are not rescaled)"
        )
    kind = cfg.get("beta_schedule", "linear")
    if kind not in _SCHEDULES:
        raise ConfigError(f"{where}: beta_schedule={kind!r} is not supported ({', '.join(_SCHEDULES)})")
    return {
        "linear_start": float(cfg.get("beta_start", 0.0001)),
        "linear_end": float(cfg.get("beta_end", 0.02)),
        "timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "beta_schedule": _SCHEDULES[kind],
        "parameterization": normalize_prediction_type(cfg.get("prediction_type", "epsilon")),
    }


# --------------------------------------------------------------------------- weights

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCK = re.compile(
    r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_UNET_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet_key(rest: str, names: Mapping[str, str]) -> str | None:
    head, _, tail = rest.partition(".")
    return f"{names[head]}.{tail}" if head in names else None


def _rename_all(
    sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], component: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in sd.items():
        new = rename(key)
        if new is None or new in out:
            unexpected.append(key)
        else:
            out[new] = tensor
    if unexpected:
        raise CheckpointError(
            f"diffusers {component} weights with no original counterpart", unexpected=sorted(unexpected)
        )
    return out


def unet_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """Rename ``UNet2DConditionModel`` weights to ``openaimodel.UNetModel`` keys.

    Raises:
        CheckpointError: a key with no original counterpart.
    """
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    attn_up = {
        int(m.group(2))
        for k in sd
        if (m := _UNET_BLOCK.match(k)) and m.group(1) == "up" and m.group(3) == "attentions"
    }

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            return f"{_UNET_TOP[module]}.{param}"
        if m := _UNET_MID.match(key):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "attentions":
                return f"middle_block.1.{rest}" if j == 0 else None
            inner = _resnet_key(rest, _UNET_RESNET)
            return f"middle_block.{2 * j}.{inner}" if inner and j in (0, 1) else None
        m = _UNET_BLOCK.match(key)
        if m is None:
            return None
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if b >= levels:
            return None
        if side == "down":
            if kind == "resnets":
                inner = _resnet_key(rest, _UNET_RESNET)
                return f"input_blocks.{1 + b * per_level + j}.0.{inner}" if inner else None
            if kind == "attentions":
                return f"input_blocks.{1 + b * per_level + j}.1.{rest}"
            if kind == "downsamplers" and j == 0 and rest.startswith("conv."):
                return f"input_blocks.{(b + 1) * per_level}.0.op.{rest[len('conv.') :]}"
            return None
        if kind == "resnets":
            inner = _resnet_key(rest, _UNET_RESNET)
            return f"output_blocks.{b * per_level + j}.0.{inner}" if inner else None
        if kind == "attentions":
            return f"output_blocks.{b * per_level + j}.1.{rest}"
        if kind == "upsamplers" and j == 0 and rest.startswith("conv."):
            sub = 2 if b in attn_up else 1
            return f"output_blocks.{b * per_level + per_level - 1}.{sub}.{rest}"
        return None

    return _rename_all(sd, rename, "unet")


_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# current (to_q ...) and pre-0.14 (query ...) names of the mid-block attention
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_BLOCK = re.compile(
    r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)$")


def vae_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: AutoencoderConfig
) -> dict[str, torch.Tensor]:
    """Rename diffusers ``AutoencoderKL`` weights to the original ``first_stage_model`` keys.

    The mid-block attention's Linear q/k/v/out weights ``[C, C]`` become 1x1 conv
    kernels ``[C, C, 1, 1]``; decoder levels are renumbered (diffusers counts up
    blocks deepest first, the original stores ``decoder.up`` highest resolution first).

    Raises:
        CheckpointError: a key with no original counterpart.
    """
    levels = len(config.ch_mult)
    out: dict[str, torch.Tensor] = {}

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        if module in _VAE_TOP:
            return f"{_VAE_TOP[module]}.{param}"
        if m := _VAE_MID.match(key):
            part, kind, j, name, param = m.groups()
            if kind == "resnets":
                inner = _resnet_key(f"{name}.{param}", _VAE_RESNET)
                return f"{part}.mid.block_{int(j) + 1}.{inner}" if inner and j in ("0", "1") else None
            return f"{part}.mid.attn_1.{_VAE_ATTN[name]}.{param}" if name in _VAE_ATTN and j == "0" else None
        m = _VAE_BLOCK.match(key)
        if m is None:
            return None
        part, side, i, kind, j, rest = m.groups()
        if int(i) >= levels or (part == "encoder") != (side == "down"):
            return None
        # the decoder's up blocks are numbered the other way round
        level = int(i) if part == "encoder" else levels - 1 - int(i)
        block = "down" if part == "encoder" else "up"
        if kind == "resnets":
            inner = _resnet_key(rest, _VAE_RESNET)
            return f"{part}.{block}.{level}.block.{j}.{inner}" if inner else None
        resample = "downsample" if kind == "downsamplers" else "upsample"
        if j == "0" and rest.startswith("conv.") and (kind == "downsamplers") == (part == "encoder"):
            return f"{part}.{block}.{level}.{resample}.{rest}"
        return None

    for key, tensor in _rename_all(sd, rename, "vae").items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> Conv2d 1x1 [C, C, 1, 1]
        out[key] = tensor
    return out


_CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def text_state_dict_from_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` weights in the 4.x layout (``text_model.*``) that our encoder uses.

    transformers 5 saves the same tensors without the ``text_model.`` level.
    """
    return {f"text_model.{k}" if k.startswith(_CLIP_TOP_LEVEL) else k: v for k, v in sd.items()}


def weights_file(folder: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read ``<stem>[.fp16].{safetensors,bin}`` or a sharded ``<stem>.*.index.json`` from ``folder``."""
    for stem in stems:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                single = folder / f"{stem}{variant}{ext}"
                if single.is_file():
                    return read_state_dict(single)
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                    merged: dict[str, torch.Tensor] = {}
                    for shard in shards:
                        merged.update(read_state_dict(folder / shard))
                    return merged
    raise CheckpointError(f"no weights in {folder} (looked for {', '.join(stems)} .safetensors / .bin)")


def read_diffusers_folder(path: str | Path, *, prediction_type: str | None = None) -> DiffusersModel:
    """Translate a diffusers Stable Diffusion folder (see the module docstring).

    Args:
        path: the folder holding ``model_index.json``.
        prediction_type: overrides ``scheduler_config.json``'s ``prediction_type``.

    Raises:
        ConfigError: a missing or unsupported component or option.
        CheckpointError: unreadable weights or weights that do not rename cleanly.
    """
    root = Path(path)
    index = read_json(root / "model_index.json")
    absent = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not index.get(c)]
    if absent:
        raise ConfigError(
            f"{root}/model_index.json lacks {', '.join(absent)}; only Stable Diffusion pipelines "
            "(unet, vae, text_encoder, tokenizer, scheduler) are supported"
        )
    unet_cfg = unet_config_from_diffusers(read_json(root / "unet" / "config.json"))
    vae_json = read_json(root / "vae" / "config.json")
    vae_cfg = vae_config_from_diffusers(vae_json)
    tokenizer_dir = root / "tokenizer"
    text_cfg = text_config_from_transformers(
        read_json(root / "text_encoder" / "config.json"), pad_token_of(tokenizer_dir)
    )
    schedule = _schedule(read_json(root / "scheduler" / "scheduler_config.json"))
    pred = normalize_prediction_type(prediction_type)
    if pred is not None:
        schedule["parameterization"] = pred

    latent = vae_cfg.embed_dim
    inpaint = unet_cfg.in_channels == 2 * latent + 1
    if unet_cfg.in_channels not in (latent, 2 * latent + 1):
        raise ConfigError(
            f"{root}: UNet takes {unet_cfg.in_channels} channels with a {latent}-channel latent"
        )
    if unet_cfg.context_dim != text_cfg.hidden_size:
        raise ConfigError(
            f"{root}: UNet cross_attention_dim {unet_cfg.context_dim} != text encoder width {text_cfg.hidden_size}"
        )
    conditioning_key = "hybrid" if inpaint else "crossattn"
    inpaint_mode = "sd" if inpaint else None
    sample_size = read_json(root / "unet" / "config.json").get("sample_size") or 64
    config = ModelConfig(
        family=classify_family(unet_cfg, text_cfg, conditioning_key, inpaint_mode),
        unet=unet_cfg,
        first_stage=vae_cfg,
        cond_stage=text_cfg,
        conditioning_key=conditioning_key,  # type: ignore[arg-type]
        scale_factor=float(vae_json.get("scaling_factor", 0.18215)),
        scale_by_std=False,
        use_ema=False,
        inpaint_mode=inpaint_mode,  # type: ignore[arg-type]
        latent_channels=latent,
        image_size=int(sample_size if isinstance(sample_size, int) else sample_size[0]),
        **schedule,
    )
    return DiffusersModel(
        config=config,
        unet=unet_state_dict_from_diffusers(
            weights_file(root / "unet", ("diffusion_pytorch_model",)), unet_cfg
        ),
        first_stage=vae_state_dict_from_diffusers(
            weights_file(root / "vae", ("diffusion_pytorch_model",)), vae_cfg
        ),
        cond_stage=text_state_dict_from_transformers(
            weights_file(root / "text_encoder", ("model", "pytorch_model"))
        ),
        tokenizer_dir=tokenizer_dir,
    )
