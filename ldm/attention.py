"""Attention blocks of the LDM UNet, with the original CompVis parameter names.

Two families live here:

* ``SpatialTransformer`` (``ldm/modules/attention.py``): GroupNorm, a 1x1 conv
  (SD 1.x) or Linear (SD 2.x) ``proj_in``, ``depth`` transformer blocks of
  self-attention, cross-attention to the conditioning sequence and a GEGLU
  feed-forward, then ``proj_out`` and a residual connection.
* ``AttentionBlock`` (``openaimodel.py``): the plain self-attention used by the
  non-text LDMs (CelebA, LSUN, ``inpainting_big``), with one ``qkv`` Conv1d and
  the "legacy" head split (heads are split *before* q, k and v).

Every attention goes through ``torch.nn.functional.scaled_dot_product_attention``
with the scale ``dim_head ** -0.5``. Dropout slots of the original
``nn.Sequential`` containers are kept as ``nn.Identity`` so that the numeric
indices in the state-dict keys (``to_out.0``, ``ff.net.2``) stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "GroupNorm32",
    "SpatialTransformer",
]


class GroupNorm32(nn.GroupNorm):
    """``GroupNorm(32, C)`` computed in float32 and cast back (``util.py GroupNorm32``).

    The UNet's ResBlocks, its output head and ``AttentionBlock`` use it; the
    affine parameters are upcast too, so half-precision weights behave like the
    reference's fp32 norms.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # half -> float32, float64 stays
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (or over ``x`` itself).

    Keys: ``to_q``, ``to_k``, ``to_v`` (Linear, no bias) and ``to_out.0`` (Linear).

    Args:
        query_dim: feature size of ``x``.
        heads: number of heads.
        dim_head: size of one head; ``inner_dim = heads * dim_head``.
        context_dim: feature size of ``context``; ``None`` means self-attention.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Identity())  # [1] = dropout slot

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, N, heads * dim_head] -> [B, heads, N, dim_head]
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, query_dim]``, ``context`` ``[B, L, context_dim]`` -> ``[B, N, query_dim]``."""
        kv = x if context is None else context
        q = self._split_heads(self.to_q(x))  # [B, h, N, d]
        k = self._split_heads(self.to_k(kv))  # [B, h, L, d]
        v = self._split_heads(self.to_v(kv))  # [B, h, L, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).flatten(2)  # [B, N, h * d]
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: ``a * gelu(g)`` with ``[a, g] = proj(x)``. Key: ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP ``dim -> mult * dim -> dim``. Keys: ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))  # [1] = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, feed-forward.

    ``x = attn1(norm1(x)) + x; x = attn2(norm2(x), context) + x; x = ff(norm3(x)) + x``,
    all on tokens ``[B, N, dim]``.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, n_heads, d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, n_heads, d_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the ``H*W`` positions of a feature map, cross-attending to ``context``.

    Keys: ``norm`` (GroupNorm(32, eps 1e-6)), ``proj_in``, ``transformer_blocks.{d}``,
    ``proj_out``.

    Args:
        in_channels: ``C`` of the feature map.
        n_heads, d_head: head geometry; the token width is ``inner_dim = n_heads * d_head``.
        depth: number of ``BasicTransformerBlock`` s.
        context_dim: feature size of the conditioning sequence.
        use_linear: SD 2.x style Linear ``proj_in``/``proj_out`` on tokens instead of
            1x1 convs on the map.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, C, H, W]``, ``context`` ``[B, L, context_dim]`` -> ``[B, C, H, W]``."""
        h, w = x.shape[-2:]
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # [B, inner, H, W]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C or inner]
        if self.use_linear:
            x = self.proj_in(x)  # [B, H*W, inner]
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # [B, H*W, C]
        # back to a contiguous NCHW tensor: a channels-last view here would make every
        # following conv re-layout its weights on each call
        x = x.transpose(1, 2).unflatten(2, (h, w)).contiguous()  # [B, C or inner, H, W]
        if not self.use_linear:
            x = self.proj_out(x)  # [B, C, H, W]
        return x + x_in


class AttentionBlock(nn.Module):
    """Plain spatial self-attention (``openaimodel.AttentionBlock``, ``QKVAttentionLegacy``).

    Keys: ``norm`` (GroupNorm32), ``qkv`` (Conv1d C -> 3C), ``proj_out`` (Conv1d C -> C).
    The legacy head split reshapes ``qkv`` ``[B, 3C, T]`` to ``[B*heads, 3*ch, T]``
    and only then splits it into q, k, v (``ch = C / heads``), so each head's q, k
    and v are contiguous rows of the ``qkv`` weight.

    Args:
        channels: ``C``.
        num_heads: number of heads; ``C`` must be divisible by it.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, kernel_size=1)
        self.proj_out = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        x_seq = x.flatten(2)  # [B, C, T], T = H*W
        qkv = self.qkv(self.norm(x_seq))  # [B, 3C, T]
        qkv = qkv.reshape(-1, 3 * self.head_dim, qkv.shape[-1])  # [B*heads, 3*ch, T]
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # 3 x [B*heads, T, ch]
        a = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [B*heads, T, ch]
        a = a.transpose(1, 2).reshape(x_seq.shape)  # [B, C, T]
        return (x_seq + self.proj_out(a)).reshape(x.shape)
