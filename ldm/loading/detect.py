"""Infer a :class:`~ldm.config.ModelConfig` from the tensor shapes of a checkpoint.

Used when a checkpoint comes without its YAML. Every dimension that shapes can
tell is read from them; what they cannot tell (head counts, noise schedule,
``scale_factor``, training resolution) comes from the released config of the
family the checkpoint belongs to.

* ``sd1``: OpenAI CLIP under ``cond_stage_model.transformer.text_model.*``; UNet
  input = latent channels. From ``v1-inference.yaml``: 8 UNet heads
  (``legacy: False``), quick-GELU CLIP, last layer, 0.00085-0.012, scale 0.18215,
  image_size 64.
* ``sd1-inpaint``: as sd1 with UNet input = 2 * latent + 1 (9); hybrid conditioning,
  ``use_ema`` True (``v1-inpainting-inference.yaml`` leaves LatentDiffusion's default).
* ``sd2``: OpenCLIP under ``cond_stage_model.model.*``. From ``v2-inference*.yaml``:
  64-channel UNet heads, GELU, penultimate layer, pad ``"!"``, same schedule and
  scale; image_size 96 for v (the 768 px model; its YAML says 64), 64 for eps.
* ``sd2-inpaint``: as sd2 with 9 input channels; eps.
* ``ldm-txt2img``: BERTEmbedder (``cond_stage_model.transformer.token_emb.weight``).
  From ``txt2img-1p4B-eval.yaml``: 8 UNet heads (``legacy: False``), 8 BERT heads,
  0.00085-0.012, scale 0.18215, image_size 32.
* ``ldm-inpaint``: no text / class encoder (or LDM's copy of the first stage under
  ``cond_stage_model.*``), UNet input = 2 * latent + 1 (7). From ``inpainting_big``:
  8 heads, 0.0015-0.0205, scale 1.0, EMA, image_size 64.
* ``ldm-class``: ClassEmbedder (``cond_stage_model.embedding.weight``). From
  ``cin256-v2.yaml``: 1 head, 0.0015-0.0195, scale 1.0, image_size 64; the last
  class id is the null class for guidance unless there are exactly 1000.

Text towers: CLIP heads are ``width / 64`` (ViT-L/14 and ViT-H-14 both use
64-channel heads). A root ``scale_factor`` buffer means ``scale_by_std`` and
gives the factor. The autoencoder's ``resolution`` (only used to place attention
levels) is taken as 256, as in every released first stage.

SD 2.x eps vs v cannot be told from shapes. ``prediction_type`` decides when given;
otherwise SD 2 inpainting is eps and other SD 2 checkpoints follow diffusers'
heuristic: ``global_step == 875000`` (the 512-base-ema release) is eps, anything
else v. This is wrong for e.g. SD 2.1-base; pass ``prediction_type`` or ship a YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm.config import (
    AutoencoderConfig,
    BERTEmbedderConfig,
    ClassEmbedderConfig,
    CLIPTextConfig,
    CondStageConfig,
    ModelConfig,
    UNetConfig,
)
from ldm.loading.checkpoint import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    split_components,
)
from ldm.loading.config_yaml import CLIP_VIT_L_14, OPENCLIP_VIT_H_14, default_unconditional_class
from ldm_serve.errors import CheckpointError, ConfigError

__all__ = [
    "FAMILY_DEFAULTS",
    "KNOWN_FAMILIES",
    "FamilyDefaults",
    "infer_model_config",
    "normalize_prediction_type",
]

AE_DEFAULT_RESOLUTION = 256
CLIP_HEAD_CHANNELS = 64  # ViT-L/14 text: 768 / 12; ViT-H-14 text: 1024 / 16


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's released config says about things shapes do not show."""

    num_heads: int
    num_head_channels: int
    legacy: bool
    linear_start: float
    linear_end: float
    scale_factor: float
    use_ema: bool
    image_size: int
    conditioning_key: str
    inpaint_mode: str | None = None


# Head rules: (num_heads, num_head_channels, legacy) of the released UNet configs.
_EIGHT_HEADS = {"num_heads": 8, "num_head_channels": -1, "legacy": False}
_HEAD_WIDTH_64 = {"num_heads": -1, "num_head_channels": 64, "legacy": False}
_SD = {"linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215}
_LDM_VQ = {"scale_factor": 1.0, "linear_start": 0.0015}

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "sd1": FamilyDefaults(**_EIGHT_HEADS, **_SD, use_ema=False, image_size=64, conditioning_key="crossattn"),
    # v1-inpainting-inference.yaml does not set use_ema, so LatentDiffusion's default (True) applies
    "sd1-inpaint": FamilyDefaults(
        **_EIGHT_HEADS, **_SD, use_ema=True, image_size=64, conditioning_key="hybrid", inpaint_mode="sd"
    ),
    "sd2": FamilyDefaults(**_HEAD_WIDTH_64, **_SD, use_ema=False, image_size=64, conditioning_key="crossattn"),
    "sd2-inpaint": FamilyDefaults(
        **_HEAD_WIDTH_64, **_SD, use_ema=False, image_size=64, conditioning_key="hybrid", inpaint_mode="sd"
    ),
    "ldm-txt2img": FamilyDefaults(
        **_EIGHT_HEADS, **_SD, use_ema=False, image_size=32, conditioning_key="crossattn"
    ),
    "ldm-inpaint": FamilyDefaults(
        num_heads=8, num_head_channels=-1, legacy=True, **_LDM_VQ, linear_end=0.0205,
        use_ema=True, image_size=64, conditioning_key="concat", inpaint_mode="ldm",
    ),
    "ldm-class": FamilyDefaults(
        num_heads=1, num_head_channels=-1, legacy=True, **_LDM_VQ, linear_end=0.0195,
        use_ema=False, image_size=64, conditioning_key="crossattn",
    ),
}  # fmt: skip
"""Per-family values from the released YAMLs (see the module docstring)."""

KNOWN_FAMILIES: tuple[str, ...] = tuple(FAMILY_DEFAULTS)

_SD2_BASE_GLOBAL_STEP = 875000


def normalize_prediction_type(value: str | None) -> str | None:
    """``"eps"`` / ``"epsilon"`` -> ``"eps"``, ``"v"`` / ``"v_prediction"`` -> ``"v"``, ``None`` -> ``None``.

    Raises:
        ConfigError: any other value.
    """
    if value is None:
        return None
    mapping = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
    if value not in mapping:
        raise ConfigError(
            f"unknown prediction_type {value!r}; expected 'eps' / 'epsilon' or 'v' / 'v_prediction'"
        )
    return mapping[value]


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``N`` of keys ``prefix + "N." + ...``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _shape(sd: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"cannot infer the {where}: the checkpoint has no {key!r}")
    return tuple(sd[key].shape)


# --------------------------------------------------------------------------- UNet


def _infer_unet(sd: Mapping[str, torch.Tensor], defaults: FamilyDefaults) -> UNetConfig:
    mc, in_channels = _shape(sd, "input_blocks.0.0.weight", "UNet input convolution")[:2]
    out_channels = _shape(sd, "out.2.weight", "UNet output convolution")[0]
    out_blocks = _indices(sd, "output_blocks.")
    if not out_blocks or out_blocks != list(range(len(out_blocks))):
        raise ConfigError("cannot infer the UNet layout: output_blocks are missing or not numbered 0..n-1")

    def is_upsampler(i: int, j: int) -> bool:
        return f"output_blocks.{i}.{j}.conv.weight" in sd or f"output_blocks.{i}.{j}.in_layers.0.weight" in sd

    upsample_blocks = [i for i in out_blocks if is_upsampler(i, 1) or is_upsampler(i, 2)]
    n_out = len(out_blocks)
    per_level = upsample_blocks[0] + 1 if upsample_blocks else n_out  # num_res_blocks + 1
    levels = n_out // per_level
    if n_out % per_level or upsample_blocks != [(k + 1) * per_level - 1 for k in range(levels - 1)]:
        raise ConfigError(
            f"cannot infer the UNet layout: upsamplers at output blocks {upsample_blocks} of {n_out}"
        )
    num_res_blocks = per_level - 1
    n_in = len(_indices(sd, "input_blocks."))
    if n_in != 1 + levels * num_res_blocks + levels - 1:
        raise ConfigError(
            f"UNet has {n_in} input blocks, expected {1 + levels * per_level - 1} for {levels} levels"
        )
    resblock_updown = bool(upsample_blocks) and any(
        f"output_blocks.{upsample_blocks[0]}.{j}.in_layers.0.weight" in sd for j in (1, 2)
    )

    channel_mult: list[int] = []
    attention_ds: list[int] = []
    for level in range(levels):
        first = (levels - 1 - level) * per_level  # output blocks run deepest level first
        ch = _shape(sd, f"output_blocks.{first}.0.out_layers.3.weight", "UNet level width")[0]
        if ch % mc:
            raise ConfigError(f"UNet level {level} has {ch} channels, not a multiple of model_channels {mc}")
        channel_mult.append(ch // mc)
        if f"output_blocks.{first}.1.norm.weight" in sd:
            attention_ds.append(2**level)

    spatial = "middle_block.1.transformer_blocks.0.attn1.to_q.weight" in sd
    if not spatial and "middle_block.1.qkv.weight" not in sd:
        raise ConfigError(
            "cannot infer the UNet attention type: middle_block.1 is neither a transformer nor an AttentionBlock"
        )
    context_dim = depth = None
    use_linear = False
    if spatial:
        context_dim = _shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "context width")[1]
        depth = len(_indices(sd, "middle_block.1.transformer_blocks."))
        use_linear = len(_shape(sd, "middle_block.1.proj_in.weight", "transformer projection")) == 2
    emb_out = _shape(sd, "middle_block.0.emb_layers.1.weight", "time-embedding projection")[0]
    mid_ch = _shape(sd, "middle_block.0.out_layers.3.weight", "middle block width")[0]
    if "label_emb.0.weight" in sd:
        raise ConfigError("sequential / ADM label embeddings (label_emb.0.*) are not supported")
    num_classes = _shape(sd, "label_emb.weight", "class embedding")[0] if "label_emb.weight" in sd else None
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(sorted(attention_ds, reverse=True)),
        num_heads=defaults.num_heads,
        num_head_channels=defaults.num_head_channels,
        legacy=defaults.legacy,
        use_spatial_transformer=spatial,
        transformer_depth=depth or 1,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        use_scale_shift_norm=emb_out == 2 * mid_ch,
        resblock_updown=resblock_updown,
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------- first stage


def _infer_autoencoder(sd: Mapping[str, torch.Tensor]) -> AutoencoderConfig:
    kind = "vq" if "quantize.embedding.weight" in sd else "kl"
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", "autoencoder input convolution")[:2]
    levels = _indices(sd, "encoder.down.")
    if not levels:
        raise ConfigError("cannot infer the autoencoder: no encoder.down.* blocks")
    num_res_blocks = len(_indices(sd, "encoder.down.0.block."))
    ch_mult = []
    attn_resolutions = []
    for level in levels:
        width = _shape(sd, f"encoder.down.{level}.block.0.conv1.weight", "autoencoder level width")[0]
        ch_mult.append(width // ch)
        if _indices(sd, f"encoder.down.{level}.attn."):
            attn_resolutions.append(AE_DEFAULT_RESOLUTION // 2**level)
    z_channels = _shape(sd, "decoder.conv_in.weight", "decoder input convolution")[1]
    enc_out = _shape(sd, "encoder.conv_out.weight", "encoder output convolution")[0]
    if kind == "vq":
        n_embed, embed_dim = _shape(sd, "quantize.embedding.weight", "codebook")
    else:
        n_embed, embed_dim = 0, _shape(sd, "post_quant_conv.weight", "post-quant convolution")[1]
    return AutoencoderConfig(
        kind=kind,
        embed_dim=embed_dim,
        z_channels=z_channels,
        resolution=AE_DEFAULT_RESOLUTION,
        in_channels=in_channels,
        out_ch=_shape(sd, "decoder.conv_out.weight", "decoder output convolution")[0],
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(attn_resolutions),
        double_z=enc_out == 2 * z_channels,
        attn_type="vanilla" if "encoder.mid.attn_1.norm.weight" in sd else "none",
        n_embed=n_embed,
    )


# --------------------------------------------------------------------------- cond stage


def _cond_kind(cond: Mapping[str, torch.Tensor]) -> str:
    if not cond:
        return "none"
    if "transformer.text_model.embeddings.token_embedding.weight" in cond:
        return "clip"
    if "model.token_embedding.weight" in cond:
        return "openclip"
    if "transformer.token_emb.weight" in cond:
        return "bert"
    if "embedding.weight" in cond:
        return "class"
    if "encoder.conv_in.weight" in cond:
        return "first_stage"
    return "unknown"


def _clip_heads(width: int) -> int:
    if width % CLIP_HEAD_CHANNELS:
        raise ConfigError(
            f"CLIP text width {width} is not a multiple of the {CLIP_HEAD_CHANNELS}-channel heads"
        )
    return width // CLIP_HEAD_CHANNELS


def _infer_clip(cond: Mapping[str, torch.Tensor]) -> CLIPTextConfig:
    sd = _strip(cond, "transformer.text_model.")
    vocab, width = _shape(sd, "embeddings.token_embedding.weight", "CLIP token embedding")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(sd, "encoder.layers.0.mlp.fc1.weight", "CLIP MLP")[0],
        num_hidden_layers=len(_indices(sd, "encoder.layers.")),
        num_attention_heads=_clip_heads(width),
        max_position_embeddings=_shape(sd, "embeddings.position_embedding.weight", "CLIP positions")[0],
        hidden_act=CLIP_VIT_L_14.hidden_act,
        layer="last",
        pad_token=CLIP_VIT_L_14.pad_token,
    )


def _infer_openclip(cond: Mapping[str, torch.Tensor]) -> CLIPTextConfig:
    sd = _strip(cond, "model.")
    vocab, width = _shape(sd, "token_embedding.weight", "OpenCLIP token embedding")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP MLP")[0],
        num_hidden_layers=len(_indices(sd, "transformer.resblocks.")),
        num_attention_heads=_clip_heads(width),
        max_position_embeddings=_shape(sd, "positional_embedding", "OpenCLIP positions")[0],
        hidden_act=OPENCLIP_VIT_H_14.hidden_act,
        layer=OPENCLIP_VIT_H_14.layer,
        pad_token=OPENCLIP_VIT_H_14.pad_token,
    )


def _infer_bert(cond: Mapping[str, torch.Tensor]) -> BERTEmbedderConfig:
    vocab, n_embed = _shape(cond, "transformer.token_emb.weight", "BERT token embedding")
    n_blocks = len(_indices(cond, "transformer.attn_layers.layers."))
    inner = _shape(cond, "transformer.attn_layers.layers.0.1.to_q.weight", "BERT attention")[0]
    heads = BERTEmbedderConfig().heads  # x-transformers default, as in BERTEmbedder
    if n_blocks % 2 or inner % heads:
        raise ConfigError(
            f"BERT encoder with {n_blocks} blocks and attention width {inner} is not an LDM BERTEmbedder"
        )
    return BERTEmbedderConfig(
        n_embed=n_embed,
        n_layer=n_blocks // 2,
        vocab_size=vocab,
        max_seq_len=_shape(cond, "transformer.pos_emb.emb.weight", "BERT positions")[0],
        heads=heads,
        dim_head=inner // heads,
    )


def _infer_class(cond: Mapping[str, torch.Tensor]) -> ClassEmbedderConfig:
    n_classes, embed_dim = _shape(cond, "embedding.weight", "class embedding")
    return ClassEmbedderConfig(
        n_classes=n_classes, embed_dim=embed_dim, unconditional_class=default_unconditional_class(n_classes)
    )


# --------------------------------------------------------------------------- entry point


def _unknown(reason: str) -> ConfigError:
    return ConfigError(
        f"unknown checkpoint architecture ({reason}); known families: {', '.join(KNOWN_FAMILIES)}. "
        "For anything else pass the model's original YAML config (config=... or <checkpoint stem>.yaml beside it)."
    )


def _missing_encoder(unet_sd: Mapping[str, torch.Tensor], in_channels: int, cond_kind: str) -> ConfigError:
    """The UNet cross-attends but the checkpoint holds no encoder to attend to (pruned)."""
    width = unet_sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    what = "no conditioning-encoder weights" if cond_kind == "none" else "only a first-stage copy as cond stage"
    return _unknown(
        f"the UNet takes {in_channels} input channels and cross-attends to {width}-channel embeddings "
        f"(Stable Diffusion-shaped), but the checkpoint has {what} under cond_stage_model.*: its text "
        "encoder was probably pruned. Give the text encoder separately (text_encoder=PATH, CLI "
        "--text-encoder: a diffusers text_encoder/ folder or a file with the cond_stage_model.* weights)"
    )


def infer_model_config(
    sd: Mapping[str, torch.Tensor],
    *,
    prediction_type: str | None = None,
    text_config: CLIPTextConfig | None = None,
) -> ModelConfig:
    """Infer the configuration of an original-layout checkpoint from its tensor shapes.

    Args:
        sd: the flat state dict from :func:`ldm.loading.checkpoint.read_state_dict`.
        prediction_type: ``"eps"``/``"epsilon"`` or ``"v"``/``"v_prediction"``;
            overrides the family default (needed for SD 2.x, see the module docstring).
        text_config: the text encoder's configuration when it is known from elsewhere
            (a separately given diffusers ``text_encoder/``, whose ``CLIPTextModel``
            weights sit under ``cond_stage_model.transformer.*`` whatever the family:
            an exact-GELU encoder makes the model SD 2, as in :func:`classify_family`).

    Raises:
        ConfigError: the checkpoint is not one of :data:`KNOWN_FAMILIES` (the message
            says which families are known and that a YAML config can be passed); in
            particular a UNet that cross-attends without any encoder in the file (a pruned
            text encoder) is refused, never taken for LDM inpainting.
    """
    pred = normalize_prediction_type(prediction_type)
    unet_sd = _strip(sd, UNET_PREFIX)
    if not unet_sd:
        try:
            unet_sd = split_components(sd, use_ema=None).unet  # EMA-only checkpoint
        except CheckpointError:
            unet_sd = {}
    if "input_blocks.0.0.weight" not in unet_sd:
        raise _unknown("no LDM UNet weights under model.diffusion_model.* or model_ema.*")
    first_sd = {k: v for k, v in _strip(sd, FIRST_STAGE_PREFIX).items() if not k.startswith("loss.")}
    if "encoder.conv_in.weight" not in first_sd:
        raise _unknown("no first-stage autoencoder under first_stage_model.*")
    cond_sd = _strip(sd, COND_STAGE_PREFIX)
    cond_kind = _cond_kind(cond_sd)

    first_stage = _infer_autoencoder(first_sd)
    latent = first_stage.embed_dim
    in_channels = unet_sd["input_blocks.0.0.weight"].shape[1]
    inpaint = in_channels == 2 * latent + 1
    if in_channels not in (latent, 2 * latent + 1):
        raise _unknown(f"UNet takes {in_channels} input channels with a {latent}-channel latent")

    cross_attends = "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in unet_sd
    if cond_kind in ("none", "first_stage") and cross_attends:
        # LDM inpainting has no cross-attention; a 9-channel SD-inpainting UNet without its
        # text encoder must not be taken for it (wrong schedule, scale and conditioning)
        raise _missing_encoder(unet_sd, in_channels, cond_kind)

    cond_stage: CondStageConfig | None
    if text_config is not None:
        if cond_kind != "clip":
            raise _unknown(f"a separately given CLIP text encoder with a {cond_kind!r} cond stage")
        base = "sd2" if text_config.hidden_act == "gelu" else "sd1"
        family, cond_stage = (f"{base}-inpaint" if inpaint else base), text_config
    elif cond_kind == "clip":
        family, cond_stage = ("sd1-inpaint" if inpaint else "sd1"), _infer_clip(cond_sd)
    elif cond_kind == "openclip":
        family, cond_stage = ("sd2-inpaint" if inpaint else "sd2"), _infer_openclip(cond_sd)
    elif cond_kind == "bert" and not inpaint:
        family, cond_stage = "ldm-txt2img", _infer_bert(cond_sd)
    elif cond_kind == "class" and not inpaint:
        family, cond_stage = "ldm-class", _infer_class(cond_sd)
    elif cond_kind in ("none", "first_stage") and inpaint:
        family, cond_stage = "ldm-inpaint", None
    else:
        raise _unknown(f"conditioning encoder {cond_kind!r} with {in_channels} UNet input channels")

    defaults = FAMILY_DEFAULTS[family]
    unet = _infer_unet(unet_sd, defaults)
    if family.startswith("sd") and not unet.use_spatial_transformer:
        raise _unknown("a text-conditioned UNet without cross-attention")
    if cond_stage is not None:
        width = (
            cond_stage.embed_dim
            if isinstance(cond_stage, ClassEmbedderConfig)
            else (
                cond_stage.n_embed if isinstance(cond_stage, BERTEmbedderConfig) else cond_stage.hidden_size
            )
        )
        if unet.context_dim != width:
            raise _unknown(f"UNet cross-attends to {unet.context_dim} channels but the encoder gives {width}")

    if pred is None:
        pred = "eps"
        if family == "sd2":
            step = sd.get("global_step")
            pred = "eps" if step is not None and int(step) == _SD2_BASE_GLOBAL_STEP else "v"
    image_size = 96 if family == "sd2" and pred == "v" else defaults.image_size
    # scale_by_std models store their factor as a root buffer (e.g. LSUN-churches KL-f8)
    stored_scale = sd.get("scale_factor")
    scale_factor = float(stored_scale) if stored_scale is not None else defaults.scale_factor
    return ModelConfig(
        family=family,
        unet=unet,
        first_stage=first_stage,
        cond_stage=cond_stage,
        conditioning_key=defaults.conditioning_key,  # type: ignore[arg-type]
        parameterization=pred,  # type: ignore[arg-type]
        linear_start=defaults.linear_start,
        linear_end=defaults.linear_end,
        timesteps=1000,
        beta_schedule="linear",
        scale_factor=scale_factor,
        scale_by_std=stored_scale is not None,
        use_ema=defaults.use_ema,
        inpaint_mode=defaults.inpaint_mode,  # type: ignore[arg-type]
        latent_channels=latent,
        image_size=image_size,
    )
