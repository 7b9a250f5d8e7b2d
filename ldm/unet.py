"""The LDM denoising UNet (``ldm.modules.diffusionmodules.openaimodel.UNetModel``).

The module tree reproduces the original one, so ``state_dict()`` keys are the
original checkpoint keys with ``model.diffusion_model.`` stripped and an
original checkpoint loads with ``strict=True``:

* ``time_embed.{0,2}``: sinusoidal embedding (``model_channels``) -> MLP (``4 * model_channels``)
* ``label_emb``: class embedding added to the time embedding (``num_classes``)
* ``input_blocks.{i}``: ``[conv_in]``, then per level ``num_res_blocks`` x
  ``[ResBlock, (attention)]`` and, except on the last level, one downsampler
  (``Downsample`` keyed ``.0.op``, or a ``ResBlock(down=True)`` with ``resblock_updown``)
* ``middle_block``: ``[ResBlock, attention, ResBlock]``
* ``output_blocks.{i}``: per level (deepest first) ``num_res_blocks + 1`` x
  ``[ResBlock, (attention), (upsampler)]``; each takes ``cat([h, skip], 1)``
* ``out.{0,2}``: GroupNorm32, SiLU, conv to ``out_channels``

Shapes (``f = 2 ** (len(channel_mult) - 1)``): ``x`` ``[B, in_channels, H, W]``
with ``H`` and ``W`` divisible by ``f``; the feature map at level ``l`` is
``[B, model_channels * channel_mult[l], H / 2**l, W / 2**l]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import AttentionBlock, GroupNorm32, SpatialTransformer
from ldm.config import UNetConfig
from ldm_serve.errors import ConfigError, InternalError

__all__ = [
    "Downsample",
    "GroupNorm32",
    "HeadGeometry",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "attention_geometry",
    "timestep_embedding",
    "validate_unet_config",
]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding of ``util.py timestep_embedding``, in float32.

    Args:
        timesteps: ``[B]`` timesteps, int or float, one per row.
        dim: embedding size (``model_channels``).
        max_period: the ``10000`` of the transformer positional encoding.

    Returns:
        ``[B, dim]`` float32 ``cat[cos(t * f), sin(t * f)]`` with
        ``f_i = exp(-ln(max_period) * i / half)``, ``i < half = dim // 2``
        (zero-padded by one column when ``dim`` is odd).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # [half]
    args = timesteps.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (key ``op``) or 2x2 average pooling.

    ``[B, C, H, W]`` -> ``[B, C_out, H/2, W/2]``.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1)
        elif out_channels != channels:
            raise ConfigError("Downsample without conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then an optional 3x3 conv (key ``conv``).

    ``[B, C, H, W]`` -> ``[B, C_out, 2H, 2W]``.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.conv: nn.Module = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        elif out_channels != channels:
            raise ConfigError("Upsample without conv cannot change the channel count")
        else:
            self.conv = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (``openaimodel.ResBlock``).

    ``h = conv(silu(norm(x)))``; ``h = h + emb_layers(emb)`` (or, with scale-shift
    norm, ``h = norm(h) * (1 + scale) + shift``); ``h = conv(dropout(silu(norm(h))))``;
    returns ``skip_connection(x) + h``. With ``up``/``down`` both paths are resampled
    (without parameters) between the first activation and the first conv.

    Keys: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}`` and
    ``skip_connection`` (1x1 conv, only when the channel count changes).

    Shapes: ``x`` ``[B, C, H, W]``, ``emb`` ``[B, emb_channels]`` ->
    ``[B, C_out, H', W']`` with ``H' = 2H`` (up), ``H/2`` (down) or ``H``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        )
        if up:
            self.resample: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Identity(),  # dropout slot of the original
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers[0], self.in_layers[1], self.in_layers[2]
        h = self.resample(act_in(norm_in(x)))
        x = self.resample(x)
        h = conv_in(h)  # [B, C_out, H', W']
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [B, C_out or 2*C_out, 1, 1]
        norm_out = self.out_layers[0]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: hands ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True)
class HeadGeometry:
    """Heads of one attention layer: ``heads * dim_head`` is the token width."""

    heads: int
    dim_head: int


def attention_geometry(cfg: UNetConfig, ch: int, *, upsample: bool = False) -> HeadGeometry:
    """Head count and size of the attention layer at a level with ``ch`` channels.

    Replays ``openaimodel.UNetModel.__init__``:

    * ``num_head_channels == -1``: ``num_heads`` heads of ``ch // num_heads``;
      otherwise ``ch // num_head_channels`` heads of ``num_head_channels``.
    * ``legacy`` with a spatial transformer recomputes ``dim_head = ch // heads``;
      ``legacy`` with an ``AttentionBlock`` passes ``num_head_channels`` through.
    * ``AttentionBlock`` then uses ``ch // dim_head`` heads, or, when that is -1, the
      head count it was given: ``num_heads``, or in the output blocks
      ``num_heads_upsample`` (which defaults to ``num_heads``).

    Raises:
        ConfigError: when the rules give no valid head geometry.
    """
    if cfg.num_head_channels == -1:
        heads = cfg.num_heads
        dim_head = ch // heads if heads > 0 else 0
    else:
        heads = ch // cfg.num_head_channels
        dim_head = cfg.num_head_channels
    if cfg.legacy:
        if cfg.use_spatial_transformer:
            dim_head = ch // heads if heads > 0 else 0
        else:
            dim_head = cfg.num_head_channels
    if cfg.use_spatial_transformer:
        geometry = HeadGeometry(heads, dim_head)
    elif dim_head == -1:
        heads = cfg.num_heads_upsample if upsample and cfg.num_heads_upsample != -1 else cfg.num_heads
        geometry = HeadGeometry(heads, ch // heads if heads > 0 else 0)
        if heads > 0 and ch % heads:
            raise ConfigError(f"AttentionBlock with {ch} channels cannot be split into {heads} heads")
    else:
        if dim_head <= 0 or ch % dim_head:
            raise ConfigError(f"AttentionBlock with {ch} channels cannot have heads of {dim_head} channels")
        geometry = HeadGeometry(ch // dim_head, dim_head)
    if geometry.heads <= 0 or geometry.dim_head <= 0:
        raise ConfigError(
            f"attention at {ch} channels gets {geometry.heads} head(s) of {geometry.dim_head} channels "
            f"(num_heads={cfg.num_heads}, num_head_channels={cfg.num_head_channels})"
        )
    if cfg.use_spatial_transformer and cfg.use_linear_in_transformer and geometry.heads * geometry.dim_head != ch:
        raise ConfigError(
            f"use_linear_in_transformer needs heads * dim_head == channels, got "
            f"{geometry.heads} * {geometry.dim_head} != {ch}"
        )
    return geometry


def validate_unet_config(cfg: UNetConfig) -> None:
    """Reject configs the original ``UNetModel`` would refuse or could not run.

    Raises:
        ConfigError: with a message naming the offending option.
    """
    if cfg.in_channels < 1 or cfg.out_channels < 1:
        raise ConfigError(f"in_channels and out_channels must be >= 1, got {cfg.in_channels}/{cfg.out_channels}")
    if cfg.model_channels < 1 or not cfg.channel_mult or any(m < 1 for m in cfg.channel_mult):
        raise ConfigError(
            f"model_channels and every channel_mult must be >= 1, got {cfg.model_channels}, {cfg.channel_mult}"
        )
    bad = [cfg.model_channels * m for m in cfg.channel_mult if (cfg.model_channels * m) % 32]
    if bad:
        raise ConfigError(
            f"GroupNorm(32) needs channel counts divisible by 32; model_channels={cfg.model_channels} "
            f"with channel_mult={cfg.channel_mult} gives {bad}"
        )
    if cfg.num_res_blocks < 0:
        raise ConfigError(f"num_res_blocks must be >= 0, got {cfg.num_res_blocks}")
    if cfg.num_heads == -1 and cfg.num_head_channels == -1:
        raise ConfigError("either num_heads or num_head_channels must be set (both are -1)")
    if cfg.use_spatial_transformer and cfg.context_dim is None:
        raise ConfigError("use_spatial_transformer needs context_dim (the cross-attention width)")
    if cfg.context_dim is not None and not cfg.use_spatial_transformer:
        raise ConfigError("context_dim is set but use_spatial_transformer is False")
    if cfg.use_spatial_transformer and cfg.transformer_depth < 1:
        raise ConfigError(f"transformer_depth must be >= 1, got {cfg.transformer_depth}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 when set, got {cfg.num_classes}")
    # Every attention layer the model will build (the middle block always has one).
    ds = 1
    for level, mult in enumerate(cfg.channel_mult):
        if ds in cfg.attention_resolutions:
            attention_geometry(cfg, cfg.model_channels * mult)
            attention_geometry(cfg, cfg.model_channels * mult, upsample=True)
        if level != len(cfg.channel_mult) - 1:
            ds *= 2
    attention_geometry(cfg, cfg.model_channels * cfg.channel_mult[-1])


class UNetModel(nn.Module):
    """The LDM UNet, checkpoint-compatible with CompVis ``openaimodel.UNetModel``.

    Args:
        config: the ``unet_config.params`` of the original YAML.

    Raises:
        ConfigError: for an option combination the original model cannot build.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        validate_unet_config(config)
        self.config = config
        cfg = config
        mc = cfg.model_channels
        time_embed_dim = 4 * mc
        self.model_channels = mc
        self.num_classes = cfg.num_classes
        self.use_spatial_transformer = cfg.use_spatial_transformer
        self.downsample_factor = 2 ** (len(cfg.channel_mult) - 1)

        self.time_embed = nn.Sequential(
            nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, time_embed_dim)

        def res_block(c_in: int, c_out: int, *, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                c_in, time_embed_dim, c_out, use_scale_shift_norm=cfg.use_scale_shift_norm, up=up, down=down
            )

        def attention(ch: int, *, upsample: bool = False) -> nn.Module:
            geo = attention_geometry(cfg, ch, upsample=upsample)
            if cfg.use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    geo.heads,
                    geo.dim_head,
                    depth=cfg.transformer_depth,
                    context_dim=cfg.context_dim,
                    use_linear=cfg.use_linear_in_transformer,
                )
            return AttentionBlock(ch, geo.heads)

        # Encoder: the channel count of every block's output is kept for the skips.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, kernel_size=3, padding=1))]
        )
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        # Decoder: deepest level first, one more block per level than the encoder.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, upsample=True))
                if level and i == cfg.num_res_blocks:
                    up = res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, kernel_size=3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype; inputs are cast to it."""
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or v) for a batch of latents.

        Args:
            x: ``[B, in_channels, H, W]`` noisy latents (plus concat conditioning),
                ``H`` and ``W`` divisible by ``2 ** (len(channel_mult) - 1)``.
            timesteps: ``[B]`` diffusion timesteps, int or float, one per row.
            context: ``[B, L, context_dim]`` cross-attention conditioning; required
                with ``use_spatial_transformer``.
            y: ``[B]`` int64 class labels; required when ``num_classes`` is set.

        Returns:
            ``[B, out_channels, H, W]`` in the dtype of ``x``.
        """
        if x.dim() != 4:
            raise InternalError("x", f"expected [B, C, H, W], got {tuple(x.shape)}")
        f = self.downsample_factor
        if not torch.jit.is_tracing() and (x.shape[-2] % f or x.shape[-1] % f):
            raise InternalError("x", f"height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        if self.use_spatial_transformer and context is None:
            raise InternalError("context", "this UNet cross-attends and needs a [B, L, context_dim] context")
        if self.num_classes is not None and y is None:
            raise InternalError("y", "this UNet is class-conditional and needs [B] class labels")
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # [B, 4 * mc]
        if self.num_classes is not None and y is not None:
            emb = emb + self.label_emb(y)
        if context is not None:
            context = context.to(dtype)

        h = x.to(dtype)
        skips: list[torch.Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # [B, mc * mult[-1], H / f, W / f]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)  # [B, out_channels, H, W]
