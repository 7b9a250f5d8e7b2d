"""Tiny model configurations used across the test suite.

Every family the loader knows has a tiny twin here: same options, a few
channels. GroupNorm(32) needs channel counts that are multiples of 32.
"""

from __future__ import annotations

from dataclasses import replace

from ldm.config import (
    AutoencoderConfig,
    BERTEmbedderConfig,
    ClassEmbedderConfig,
    CLIPTextConfig,
    UNetConfig,
)
from ldm.tiny import TINY_UNET

# SD 1.x shape: conv proj_in, fixed head count (legacy=False), context 32: the one tiny UNet.
UNET_SD1 = TINY_UNET

# SD 2.x shape: linear proj_in/out, head channels instead of a head count.
UNET_SD2 = replace(
    TINY_UNET, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, context_dim=48
)

# SD inpainting: 4 latent + 1 mask + 4 masked-image latent channels in.
UNET_SD1_INPAINT = UNetConfig(**{**UNET_SD1.__dict__, "in_channels": 9})

# LDM inpainting_big shape: no spatial transformer, AttentionBlock levels,
# BigGAN up/down ResBlocks, scale-shift norm, 7 = 3 + 3 + 1 input channels.
UNET_LDM_INPAINT = UNetConfig(
    in_channels=7,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=2,
    use_scale_shift_norm=True,
    resblock_updown=True,
)

# LDM class-conditional (cin256-v2 shape): cross-attention to a class embedding.
UNET_CLASS = UNetConfig(
    in_channels=3,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=1,
    use_spatial_transformer=True,
    context_dim=32,
)

# kl-f8 shape at a fraction of the width.
AE_KL_F8 = AutoencoderConfig(
    kind="kl",
    embed_dim=4,
    z_channels=4,
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    double_z=True,
)

# vq-f4 shape and vq-f4-noattn shape.
AE_VQ_F4 = AutoencoderConfig(
    kind="vq",
    embed_dim=3,
    z_channels=3,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    double_z=False,
    n_embed=64,
)
AE_VQ_F4_NOATTN = AutoencoderConfig(**{**AE_VQ_F4.__dict__, "attn_type": "none"})

CLIP_TINY = CLIPTextConfig(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
)

BERT_TINY = BERTEmbedderConfig(n_embed=32, n_layer=2, vocab_size=200, max_seq_len=77, heads=2, dim_head=16)

CLASS_TINY = ClassEmbedderConfig(n_classes=11, embed_dim=32, unconditional_class=10)
