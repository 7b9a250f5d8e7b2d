"""Model sizes and hyper-parameters of the bundled model (``bundled``) and of a seconds-long ``smoke`` run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ldm.config import AutoencoderConfig, BERTEmbedderConfig, ModelConfig, UNetConfig
from ldm.data.shapes import IMAGE_SIZE, vocab_tokens
from ldm.tiny import TINY_UNET
from ldm.training.autoencoder import AutoencoderTrainConfig, DecoderFinetuneConfig
from ldm.training.diffusion import DiffusionTrainConfig

__all__ = ["PRESETS", "Preset"]

_VOCAB_SIZE = len(vocab_tokens())


@dataclass(frozen=True)
class Preset:
    """A model configuration plus the default hyper-parameters of both stages."""

    model: ModelConfig
    autoencoder: AutoencoderTrainConfig
    diffusion: DiffusionTrainConfig
    eval_scenes: int  # held-out scenes for the autoencoder PSNR
    decoder: DecoderFinetuneConfig = DecoderFinetuneConfig()
    # stage 2b: rounds of more diffusion steps on a two-object-heavy mix, where attribute
    # binding ("a red circle left of a blue square") is learnt; each round starts at the
    # previous round's (or stage 2's) EMA weights with a fresh optimizer and schedule
    binding: tuple[DiffusionTrainConfig, ...] = ()


def _model(unet: UNetConfig, ae: AutoencoderConfig, text: BERTEmbedderConfig) -> ModelConfig:
    return ModelConfig(
        family="ldm-txt2img",
        unet=unet,
        first_stage=ae,
        cond_stage=text,
        conditioning_key="crossattn",
        parameterization="eps",
        linear_start=0.00085,  # the LDM txt2img / SD "linear" schedule
        linear_end=0.012,
        timesteps=1000,
        beta_schedule="linear",
        scale_factor=1.0,  # replaced by 1/std of the first latent batch
        scale_by_std=True,
        use_ema=False,  # the exported weights ARE the EMA weights
        latent_channels=ae.embed_dim,
        image_size=IMAGE_SIZE // ae.downsample_factor,
    )


_AE_F4 = AutoencoderConfig(
    kind="kl",
    embed_dim=4,
    z_channels=4,
    resolution=IMAGE_SIZE,
    ch=32,  # GroupNorm(32) needs multiples of 32
    ch_mult=(1, 2, 2),  # f = 4: 64x64x3 -> 16x16x4
    num_res_blocks=1,
    attn_resolutions=(),
    double_z=True,
)

_BINDING_ROUND_1 = DiffusionTrainConfig(
    steps=2400, batch_size=32, lr=3e-4, warmup_steps=100, ema_decay=0.9995, min_snr_gamma=5.0, two_object_prob=0.75
)
# a warm restart at half the peak rate: two-object prompts 73% -> 79% right
_BINDING_ROUND_2 = dataclasses.replace(_BINDING_ROUND_1, steps=1200, lr=1.5e-4)

BUNDLED = Preset(
    model=_model(
        UNetConfig(
            in_channels=4,
            out_channels=4,
            model_channels=64,
            # 64 channels at both 16x16 and 8x8: (1, 2) costs 1.6x the FLOPs, i.e. fewer
            # training steps in the CPU budget and slower inference (GroupNorm(32) rules out 48)
            channel_mult=(1, 1),
            num_res_blocks=1,
            attention_resolutions=(1, 2),  # spatial transformers at 16x16 and 8x8 (and the middle)
            num_heads=4,
            legacy=False,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=128,
        ),
        _AE_F4,
        BERTEmbedderConfig(n_embed=128, n_layer=4, vocab_size=_VOCAB_SIZE, heads=4, dim_head=32),
    ),
    autoencoder=AutoencoderTrainConfig(steps=6000, batch_size=16, lr=2e-3, warmup_steps=100, crop=32),
    diffusion=DiffusionTrainConfig(
        steps=5000, batch_size=32, lr=6e-4, warmup_steps=200, ema_decay=0.9999, min_snr_gamma=5.0
    ),
    eval_scenes=128,
    decoder=DecoderFinetuneConfig(steps=1000, batch_size=16, lr=3e-4, warmup_steps=50, latent_noise=0.3),
    binding=(_BINDING_ROUND_1, _BINDING_ROUND_2),
)

SMOKE = Preset(
    model=_model(
        TINY_UNET,
        _AE_F4,
        BERTEmbedderConfig(n_embed=32, n_layer=1, vocab_size=_VOCAB_SIZE, heads=2, dim_head=16),
    ),
    autoencoder=AutoencoderTrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, crop=16),
    diffusion=DiffusionTrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=0.99),
    eval_scenes=4,
    decoder=DecoderFinetuneConfig(steps=2, batch_size=2, lr=1e-4, warmup_steps=1, latent_noise=0.3),
    binding=(
        DiffusionTrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1, ema_decay=0.99, two_object_prob=0.75),
    ),
)

PRESETS: dict[str, Preset] = {"bundled": BUNDLED, "smoke": SMOKE}
