"""Batch-invariant CPU kernels: a row's numbers never depend on how many rows share the call.

CPU convolution and GEMM libraries pick kernels (blocking, reduction order) by
problem size, so the same image computed alone or inside a batch of eight rounds
differently. The engine used to buy batch invariance with one-row UNet calls;
these kernels buy it per operator instead, so a whole shard of rows runs as one
call (``docs/benchmarks.md``, "Batch invariance without one-row calls", has the
measurements):

* **convolution**: ``F.conv2d`` chooses its backend per call (oneDNN for batches,
  ATen's im2col kernel for most one-image calls), so a row alone and the row in a
  batch take different kernels. Calling oneDNN directly (:func:`onednn_conv2d`) runs
  every image with the same kernel at any batch size; 1x1 convolutions use ATen's
  im2col kernel (:func:`im2col_conv2d`, one GEMM per image: invariant by construction
  and faster than oneDNN there).
* **linear** (:func:`invariant_linear`): rows of several tokens (attention,
  feed-forward, text encoder) go to oneDNN's matmul (:func:`onednn_linear`): it
  flattens rows and tokens into M, yet a row's results were measured independent of
  M for rows of 2 to 4096 tokens, and it runs AVX-512 code where MKL's GEMM does not
  (on AMD CPUs MKL stays on its AVX2 path: about 2x slower). Rows of one token (the
  time embedding) take ``torch.bmm`` with the weight expanded per row: one GEMM per
  row, always of the row's own shape, whatever the batch (``F.linear`` and oneDNN
  both switch from a GEMV to a GEMM between M = 1 and M = 2).
* **attention blocks**: :class:`InvariantCrossAttention` computes q, k, v (or k, v
  over the context) in one matmul; :class:`InvariantGEGLU` runs the feed-forward
  projection as two oneDNN matmuls with the GELU and the product as post-ops.
  ``scaled_dot_product_attention``, GroupNorm, LayerNorm, softmax and element-wise
  operators already work per row and are left as they are.

These are properties of the CPU libraries, not promises of their APIs, so
``tests/unit/test_batch_invariant_kernels.py`` proves them for every convolution,
linear and attention shape of the UNet, text encoder and decoder (taken from the
module trees), at batch sizes 1 to 8, eagerly and traced (TorchScript), and the
pipeline and engine tests check whole images. Rows of one token through a whole
transformer block are tested too (ATen's GELU on a strided slice is not invariant
there; :class:`InvariantGEGLU` makes the gate contiguous). ``bench/kernel_bench.py`` compares the
formulations' speed.

:func:`make_batch_invariant` converts a model in place (class swap, same
parameters and state dict). The TorchScript backend keeps the kernels (a trace
records them as they are); other backends may rewrite them, so
:func:`is_batch_invariant` is true only for eager and TorchScript modules converted here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import GEGLU, CrossAttention

__all__ = [
    "InvariantConv2d",
    "InvariantCrossAttention",
    "InvariantGEGLU",
    "InvariantLinear",
    "CONV_FORMULATIONS",
    "im2col_conv2d",
    "invariant_linear",
    "is_batch_invariant",
    "make_batch_invariant",
    "default_kernels",
    "onednn_conv2d",
    "onednn_linear",
    "onednn_linear_mul",
    "per_row_linear",
    "revert_batch_invariant",
    "takes_onednn_linear",
]

_MARK = "_ldm_batch_invariant"
_KEEPS_KERNELS = ("eager", "torchscript")  # backends that run the converted graph as it is
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int]
) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` (groups 1, dilation 1) on oneDNN, whatever the batch size.

    ``F.conv2d`` picks its backend per call (oneDNN for batches, ATen's im2col kernel
    for many one-image calls), which is what makes a row alone differ from the row in
    a batch. Called directly, oneDNN's NCHW convolution runs every image with the same
    kernel from a batch of one to sixteen (measured for every shape of our models,
    ``tests/unit/test_batch_invariant_kernels.py``).

    Args:
        x: ``[N, C_in, H, W]``.

    Returns:
        ``[N, C_out, H', W']``, contiguous.
    """
    return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, padding, stride, [1, 1], 1)


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none"
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN's matmul (the batch and tokens flattened into M).

    Batch-invariant for rows of two or more tokens: a row's results do not depend on
    M (measured, not promised by oneDNN: every shape of our models and SD's widths,
    2 to 4096 tokens, 1 to 8 rows; ``tests/unit/test_batch_invariant_kernels.py``
    re-proves it for our models). Not for one-token rows: at M = 1 oneDNN takes a
    GEMV path.

    Args:
        x: ``[..., in]``; weight ``[out, in]``; bias ``[out]`` or ``None``.
        post: ``"none"``, or ``"gelu"`` for ``F.gelu`` (erf) fused into the matmul's output.

    Returns:
        ``[..., out]``.
    """
    if torch.jit.is_tracing():  # the tracer cannot record the empty ``Scalar?[]``; a scripted call can
        return _scripted_onednn_linear()(x.contiguous(), weight, bias, post)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, post, [], "none")


def _onednn_linear_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "none")


def onednn_linear_mul(
    x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias) * other`` in one oneDNN matmul (the product as its post-op).

    Batch-invariant under the same condition as :func:`onednn_linear` (rows of two or
    more tokens): the post-op is element-wise.
    """
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), weight, bias, "mul")


@functools.cache
def _scripted_onednn_linear() -> torch.jit.ScriptFunction:
    return torch.jit.script(_onednn_linear_body)


def takes_onednn_linear(x: torch.Tensor) -> bool:
    """Whether :func:`invariant_linear` runs ``x`` on oneDNN: rows (dim 0) of two or more tokens."""
    return _HAS_ONEDNN and x.shape[1:-1].numel() > 1


def per_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as one ``bmm`` GEMM per row of ``x``'s first dimension.

    Each GEMM has the row's own shape ``[tokens, in] x [in, out]`` whatever the batch:
    invariant by construction, for any token count.
    """
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, in]
    w = weight.t()  # [in, out]
    w = w.expand(rows.shape[0], w.shape[0], w.shape[1])  # [N, in, out], no copy
    if bias is None:
        out = torch.bmm(rows, w)  # [N, T, out]
    else:  # the bias enters each row's GEMM as its C matrix
        out = torch.baddbmm(bias.expand(rows.shape[0], rows.shape[1], bias.shape[0]), rows, w)
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with every row's numbers independent of the batch size.

    Rows (``x``'s first dimension) of several tokens take :func:`onednn_linear`;
    rows of one token, or a torch build without oneDNN, take :func:`per_row_linear`.

    Args:
        x: ``[N, ..., in]``; weight ``[out, in]``; bias ``[out]`` or ``None``.

    Returns:
        ``[N, ..., out]``.
    """
    if takes_onednn_linear(x):
        return onednn_linear(x, weight, bias)
    return per_row_linear(x, weight, bias)


def im2col_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int]
) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` (groups 1, dilation 1) as one im2col + GEMM per image.

    ATen's ``thnn_conv2d`` loops over the images: each is unfolded into its own
    ``[C_in*kh*kw, H'*W']`` buffer and multiplied by the ``[C_out, C_in*kh*kw]`` weight,
    always the same GEMM whatever the batch, so invariance holds by construction.

    Args:
        x: ``[N, C_in, H, W]``.

    Returns:
        ``[N, C_out, H', W']``, contiguous.
    """
    kernel = [weight.shape[2], weight.shape[3]]
    return torch._C._nn.thnn_conv2d(x.contiguous(), weight.contiguous(), kernel, bias, stride, padding)


CONV_FORMULATIONS = ("hybrid", "im2col")


class InvariantConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by a batch-invariant formulation (same parameters and state dict).

    ``formulation``: ``"hybrid"`` (the default: :func:`onednn_conv2d` for spatial
    kernels, :func:`im2col_conv2d` for 1x1 ones, where it is one plain GEMM per image
    and oneDNN is 2-5x slower) or ``"im2col"`` (:func:`im2col_conv2d` for all; 2-5x
    slower on large 3x3 convolutions).
    """

    formulation: str = "hybrid"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.formulation == "im2col" or self.kernel_size == (1, 1):
            return im2col_conv2d(x, self.weight, self.bias, list(self.stride), list(self.padding))
        return onednn_conv2d(x, self.weight, self.bias, list(self.stride), list(self.padding))


class InvariantLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`invariant_linear` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


class InvariantGEGLU(GEGLU):
    """``GEGLU`` (``a * gelu(g)``, ``[a, g] = proj(x)``) as two fused oneDNN matmuls.

    ``g = gelu(x W_g + b_g)`` with the GELU as the matmul's post-op, then
    ``(x W_a + b_a) * g`` with the product as the second one's: no ``[N, T, 2 * inner]``
    intermediate, no separate GELU and product passes (1.1-1.7x the unfused feed-forward
    projection, ``docs/benchmarks.md``). ``W_a`` / ``W_g`` are the halves of ``proj.weight``
    (views: the state dict is unchanged). Rows of one token use ``proj`` (an
    :class:`InvariantLinear`) and the plain formula on a contiguous gate.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not takes_onednn_linear(x):
            a, gate = self.proj(x).chunk(2, dim=-1)
            # contiguous: ATen's GELU rounds a strided one-token slice differently from
            # the same slice of a lone row (which counts as contiguous)
            return a * F.gelu(gate.contiguous())
        inner = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        gate = onednn_linear(x, w[inner:], b[inner:], post="gelu")  # [N, T, inner]
        return onednn_linear_mul(x, gate, w[:inner], b[:inner])  # [N, T, inner]


class InvariantCrossAttention(CrossAttention):
    """``CrossAttention`` with its projections fused: one matmul for q, k, v (self-attention)
    or for k, v (over the context), on :func:`invariant_linear`.

    The concatenated weights are built from the parameters on every call (a frozen
    TorchScript trace folds them into constants), so the state dict is unchanged.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # [3 * inner, dim]
            q, k, v = invariant_linear(x, w, None).chunk(3, dim=-1)  # 3 x [B, N, inner]
        else:
            q = invariant_linear(x, self.to_q.weight, None)  # [B, N, inner]
            w = torch.cat([self.to_k.weight, self.to_v.weight])  # [2 * inner, context_dim]
            k, v = invariant_linear(context, w, None).chunk(2, dim=-1)  # 2 x [B, L, inner]
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # [B, h, *, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, h, N, d]
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, N, query_dim]


_SWAPS: dict[type, type] = {  # plain class -> invariant
    nn.Linear: InvariantLinear,
    GEGLU: InvariantGEGLU,
    CrossAttention: InvariantCrossAttention,
}
_PLAIN = {v: k for k, v in _SWAPS.items()}


def _convertible_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


@torch.no_grad()
def make_batch_invariant(module: nn.Module, *, conv: str = "hybrid") -> nn.Module:
    """Swap ``module``'s plain ``Conv2d`` and ``Linear`` layers for the invariant ones, in place.

    Args:
        conv: the convolution formulation, ``"hybrid"`` or ``"im2col"`` (see
            :class:`InvariantConv2d`); converting again switches it.

    Returns ``module``, marked for :func:`is_batch_invariant`; parameters are untouched.
    Without oneDNN in the torch build every convolution takes the im2col formulation.
    """
    if conv not in CONV_FORMULATIONS:
        raise ValueError(f"conv must be one of {CONV_FORMULATIONS}, got {conv!r}")
    if not torch.backends.mkldnn.is_available():  # a torch build without oneDNN: ATen's kernel only
        conv = "im2col"
    for m in module.modules():
        if _convertible_conv(m) or isinstance(m, InvariantConv2d):
            m.__class__ = InvariantConv2d
            m.formulation = conv
        elif type(m) in _SWAPS:
            m.__class__ = _SWAPS[type(m)]
    object.__setattr__(module, _MARK, True)
    return module


def is_batch_invariant(fn: Any) -> bool:
    """Whether ``fn`` (a module, a ``CompiledUNet`` or a compiled decoder) runs the invariant kernels.

    True for modules converted by :func:`make_batch_invariant` and for their
    eager or TorchScript compilations; false for anything else (other backends
    may fuse or replace the kernels).
    """
    fn = getattr(fn, "__self__", fn)  # a bound method such as first_stage.decode
    backend = getattr(fn, "backend", None)
    if backend is not None:
        if backend not in _KEEPS_KERNELS:
            return False
        fn = getattr(fn, "eager", None) or getattr(fn, "source", None)
    return bool(getattr(fn, _MARK, False)) if fn is not None else False


def revert_batch_invariant(module: nn.Module) -> list[tuple[nn.Module, type, str | None]]:
    """Put the plain ``nn.Conv2d`` / ``nn.Linear`` classes back in ``module``, in place (no copy).

    Returns ``(layer, invariant class, formulation)`` for every layer changed, so that
    :func:`default_kernels` can convert them again; the mark is dropped.
    """
    changed: list[tuple[nn.Module, type, str | None]] = []
    for m in module.modules():
        m.__dict__.pop(_MARK, None)
        if isinstance(m, InvariantConv2d):
            changed.append((m, type(m), m.__dict__.pop("formulation", None)))
            m.__class__ = nn.Conv2d
        elif type(m) in _PLAIN:
            changed.append((m, type(m), None))
            m.__class__ = _PLAIN[type(m)]
    return changed


@contextmanager
def default_kernels(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with the plain kernels for the duration (e.g. an ONNX export), then as it was."""
    marked = bool(module.__dict__.get(_MARK, False))
    changed = revert_batch_invariant(module)
    try:
        yield module
    finally:
        for m, cls, formulation in changed:
            m.__class__ = cls
            if formulation is not None:
                m.formulation = formulation
        if marked:
            object.__setattr__(module, _MARK, True)
