"""Typed configuration of the latent diffusion model family.

One frozen dataclass per component, with field names taken from the original
LDM YAML files (``model.params.unet_config.params`` etc.) so that a YAML file
maps onto them one to one. ``ModelConfig`` ties the parts together.

The YAML parser and the shape-based family detection live in
``ldm.loading.config_yaml`` and ``ldm.loading.detect``; this module only holds the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Parameterization = Literal["eps", "v"]
ConditioningKey = Literal["none", "crossattn", "concat", "hybrid", "adm"]


@dataclass(frozen=True)
class UNetConfig:
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel`` params.

    ``attention_resolutions`` holds downsampling factors ``ds`` (1, 2, 4, ...),
    not pixel sizes, exactly as in the original configs.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    legacy: bool = True
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: int | None = None
    conv_resample: bool = True


@dataclass(frozen=True)
class AutoencoderConfig:
    """First-stage model: ``AutoencoderKL`` (kind="kl") or ``VQModel`` (kind="vq").

    Field names follow ``first_stage_config.params`` and its ``ddconfig``.
    """

    kind: Literal["kl", "vq"] = "kl"
    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True
    attn_type: Literal["vanilla", "none"] = "vanilla"
    n_embed: int = 0  # VQ codebook size
    give_pre_end: bool = False

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent (8 for kl-f8)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer as stored under ``cond_stage_model.transformer.text_model``.

    ``layer`` selects the hidden state handed to the UNet: ``"last"`` (SD 1.x) or
    ``"penultimate"`` (SD 2.x style clip skip); both go through the final layer norm.
    """

    kind: Literal["clip"] = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    layer: Literal["last", "penultimate"] = "last"
    pad_token: str = "<|endoftext|>"


@dataclass(frozen=True)
class BERTEmbedderConfig:
    """LDM ``BERTEmbedder``: an x-transformers encoder over BERT WordPiece tokens."""

    kind: Literal["bert"] = "bert"
    n_embed: int = 1280
    n_layer: int = 32
    vocab_size: int = 30522
    max_seq_len: int = 77
    heads: int = 8
    dim_head: int = 64
    use_tokenizer: bool = True


@dataclass(frozen=True)
class ClassEmbedderConfig:
    """LDM ``ClassEmbedder``: ``nn.Embedding(n_classes, embed_dim)`` -> ``[B, 1, embed_dim]``."""

    kind: Literal["class"] = "class"
    n_classes: int = 1000
    embed_dim: int = 512
    key: str = "class"
    # the "null" class used for classifier-free guidance (cin256-v2: class 1000 of 1001);
    # None = the model has none (guidance impossible) unless n_classes == 1001
    unconditional_class: int | None = None


CondStageConfig = CLIPTextConfig | BERTEmbedderConfig | ClassEmbedderConfig


@dataclass(frozen=True)
class ModelConfig:
    """A complete latent diffusion model: first stage, UNet, conditioning and schedule.

    ``inpaint_mode`` says how a concat-conditioned UNet takes its extra channels:
    ``"sd"`` = [x | mask | masked-image latent] with a {0,1} mask (SD inpainting,
    ``hybrid``), ``"ldm"`` = [x | masked-image latent | mask] with a {-1,+1} mask
    (LDM ``inpainting_big``, ``concat`` with ``__is_first_stage__`` cond stage),
    ``None`` for plain models (inpainting then blends masks inside DDIM).
    """

    family: str
    unet: UNetConfig
    first_stage: AutoencoderConfig
    cond_stage: CondStageConfig | None = None
    conditioning_key: ConditioningKey = "crossattn"
    parameterization: Parameterization = "eps"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    beta_schedule: str = "linear"
    scale_factor: float = 0.18215
    scale_by_std: bool = False
    use_ema: bool = False
    inpaint_mode: Literal["sd", "ldm"] | None = None
    latent_channels: int = 4
    image_size: int = 64  # latent side the model was trained at
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def downsample_factor(self) -> int:
        return self.first_stage.downsample_factor

    @property
    def default_image_size(self) -> int:
        """Pixel side length the model was trained at (latent side * f)."""
        return self.image_size * self.downsample_factor
