"""Layers of the first-stage autoencoder (CompVis ``ldm/modules/diffusionmodules/model.py``).

Attribute names are those of the original modules so that state-dict keys match
the released checkpoints: ``norm1, conv1, norm2, conv2, nin_shortcut`` in a
residual block, ``norm, q, k, v, proj_out`` in an attention block, ``conv`` in
the resampling layers. The autoencoder has no timestep embedding (``temb_ch=0``),
so there is no ``temb_proj``; dropout is 0 at inference and is left out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttnType = Literal["vanilla", "none"]


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, C, eps=1e-6) with affine parameters, the autoencoder's only norm."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(swish(norm2(conv1(swish(norm1(x))))))`` with a 1x1 ``nin_shortcut`` when C changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    ``q``, ``k``, ``v`` and ``proj_out`` are 1x1 convolutions, as in the checkpoints.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # [B, C, H, W]
        # [B, C, H, W] -> [B, H*W, C]: one token per position, one head of width C
        q = self.q(h).flatten(2).transpose(1, 2)
        k = self.k(h).flatten(2).transpose(1, 2)
        v = self.v(h).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, H*W, C]
        out = out.transpose(1, 2).reshape_as(x)  # [B, C, H, W]
        return x + self.proj_out(out)


def make_attn(channels: int, attn_type: AttnType) -> nn.Module:
    """``AttnBlock`` for ``"vanilla"``; a key-less ``nn.Identity`` for ``"none"``."""
    if attn_type == "vanilla":
        return AttnBlock(channels)
    return nn.Identity()


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # asymmetric, as the original
        return self.conv(x)  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        return self.conv(x)
