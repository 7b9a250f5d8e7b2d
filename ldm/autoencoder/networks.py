"""Encoder and Decoder of the first-stage autoencoder, laid out as CompVis ``model.py``.

With ``L = len(ch_mult)`` levels and ``f = 2**(L-1)``:

- ``Encoder``: ``conv_in`` -> ``down.{i}`` for i = 0..L-1 (``num_res_blocks`` blocks,
  attention after each block where the level's resolution is in ``attn_resolutions``,
  ``downsample`` on all but the last level) -> ``mid`` -> ``norm_out`` -> ``conv_out``.
  ``[B, in_channels, H, W] -> [B, (2 if double_z else 1) * z_channels, H/f, W/f]``.
- ``Decoder``: ``conv_in`` -> ``mid`` -> ``up.{i}`` for i = L-1..0 (``num_res_blocks + 1``
  blocks, ``upsample`` on all but level 0) -> ``norm_out`` -> ``conv_out``.
  ``up`` is stored highest-resolution first, so ``up.0`` is applied last.
  ``[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]``.

``resolution`` is only used to decide where attention goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.blocks import AttnType, Downsample, ResnetBlock, Upsample, make_attn, normalize
from ldm.config import AutoencoderConfig


class _Level(nn.Module):
    """One resolution level: ``block`` (ModuleList), ``attn`` (ModuleList) and an optional resampler.

    ``resample`` is registered under the original name (``downsample``/``upsample``)
    so checkpoints load; it is absent on the level that does not resample.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        has_attn = len(self.attn) > 0  # structural, fixed at construction
        for j, block in enumerate(self.block):
            h = block(h)
            if has_attn:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    def __init__(self, channels: int, attn_type: AttnType) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image -> latent moments (KL) or pre-quantization latent (VQ)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, ch_mult = config.ch, tuple(config.ch_mult)
        num_levels = len(ch_mult)
        in_ch_mult = (1, *ch_mult)

        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = config.resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(num_levels):
            block_in = ch * in_ch_mult[i]
            block_out = ch * ch_mult[i]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in config.attn_resolutions:
                    attns.append(make_attn(block_in, config.attn_type))
            level = _Level(blocks, attns)
            if i != num_levels - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, config.attn_type)
        self.norm_out = normalize(block_in)
        out_channels = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i != last:
                h = level.downsample(h)
        h = self.mid(h)  # [B, ch*ch_mult[-1], H/f, W/f]
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]`` (unclamped)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, ch_mult = config.ch, tuple(config.ch_mult)
        num_levels = len(ch_mult)
        self.give_pre_end = config.give_pre_end

        block_in = ch * ch_mult[-1]
        curr_res = config.resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, config.attn_type)

        levels: list[_Level] = []  # built lowest resolution first, stored reversed
        for i in reversed(range(num_levels)):
            block_out = ch * ch_mult[i]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in config.attn_resolutions:
                    attns.append(make_attn(block_in, config.attn_type))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # up.0 = highest resolution

        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch*ch_mult[-1], h, w]
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = level.run_blocks(h)
            if i != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_ch, h*f, w*f]
