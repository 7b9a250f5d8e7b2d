"""Batch-invariant CPU kernels: a row's numbers never depend on how many rows share the call.

CPU convolution and GEMM libraries pick kernels (blocking, reduction order) by
problem size, so the same image computed alone or inside a batch of eight rounds
differently. The engine used to buy batch invariance with one-row UNet calls;
these kernels buy it per operator instead, so a whole shard of rows runs as one
call (``docs/benchmarks.md``, "Batch-invariant kernels", has the measurements):

* **convolution** (:func:`invariant_conv2d`): oneDNN's channels-last convolution
  computes every image of a batch of two or more with the same kernel, so an
  image's result does not depend on the batch; a one-image call picks another
  kernel, so one image is run as a batch of two (itself twice) and the copy dropped.
* **linear** (:func:`invariant_linear`): ``torch.bmm`` with the weight expanded
  per row: one GEMM per row, always of the row's own shape ``[tokens, in] x [in, out]``,
  whatever the batch (``F.linear`` flattens the batch into the GEMM's M dimension
  and MKL then takes other paths, e.g. a GEMV for the time embedding's single token).
* attention (``scaled_dot_product_attention``), GroupNorm, LayerNorm, softmax and
  element-wise operators already work per row and are left as they are.

These are properties of the CPU libraries, not promises of their APIs, so
``tests/unit/test_batch_invariant_kernels.py`` proves them for every convolution,
linear and attention shape of the UNet, text encoder and decoder (taken from the
module trees), at batch sizes 1 to 8, eagerly and traced (TorchScript), and the
pipeline and engine tests check whole images. ``bench/kernel_bench.py`` compares the
formulations' speed.

:func:`make_batch_invariant` converts a model in place (class swap, same
parameters and state dict). The TorchScript backend keeps the kernels (the
one-image branch is scripted, so it survives tracing); other backends may
rewrite them, so :func:`is_batch_invariant` is true only for eager and
TorchScript modules converted here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InvariantConv2d",
    "InvariantLinear",
    "CONV_FORMULATIONS",
    "im2col_conv2d",
    "invariant_conv2d",
    "invariant_linear",
    "is_batch_invariant",
    "make_batch_invariant",
]

_MARK = "_ldm_batch_invariant"
_KEEPS_KERNELS = ("eager", "torchscript")  # backends that run the converted graph as it is


@torch.jit.script
def invariant_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int]
) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` (groups 1, dilation 1) whose row ``i`` depends only on ``x[i]``.

    Args:
        x: ``[N, C_in, H, W]``, any memory format (made channels-last).

    Returns:
        ``[N, C_out, H', W']`` in channels-last memory format.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[0] == 1:  # oneDNN's one-image kernel rounds differently: run it as a batch of two
        return F.conv2d(torch.cat([x, x]), weight, bias, stride, padding)[:1]
    return F.conv2d(x, weight, bias, stride, padding)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as one GEMM per row of ``x``'s first dimension.

    Args:
        x: ``[N, ..., in]``; weight ``[out, in]``; bias ``[out]`` or ``None``.

    Returns:
        ``[N, ..., out]``.
    """
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, in]
    w = weight.t()  # [in, out]
    w = w.expand(rows.shape[0], w.shape[0], w.shape[1])  # [N, in, out], no copy
    if bias is None:
        out = torch.bmm(rows, w)  # [N, T, out]
    else:  # the bias enters each row's GEMM as its C matrix
        out = torch.baddbmm(bias.expand(rows.shape[0], rows.shape[1], bias.shape[0]), rows, w)
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


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


CONV_FORMULATIONS = ("im2col", "onednn")


class InvariantConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by a batch-invariant formulation (same parameters and state dict).

    ``formulation``: ``"im2col"`` (:func:`im2col_conv2d`, the default) or ``"onednn"``
    (:func:`invariant_conv2d`).
    """

    formulation: str = "im2col"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.formulation == "onednn":
            return invariant_conv2d(x, self.weight, self.bias, list(self.stride), list(self.padding))
        return im2col_conv2d(x, self.weight, self.bias, list(self.stride), list(self.padding))


class InvariantLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`invariant_linear` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


def _convertible_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


@torch.no_grad()
def make_batch_invariant(module: nn.Module, *, conv: str = "im2col") -> nn.Module:
    """Swap ``module``'s plain ``Conv2d`` and ``Linear`` layers for the invariant ones, in place.

    Args:
        conv: the convolution formulation, ``"im2col"`` or ``"onednn"`` (see
            :class:`InvariantConv2d`); converting again switches it.

    Returns ``module``, marked for :func:`is_batch_invariant`. Parameters keep their values
    (the oneDNN formulation moves convolution weights to channels-last memory format).
    """
    if conv not in CONV_FORMULATIONS:
        raise ValueError(f"conv must be one of {CONV_FORMULATIONS}, got {conv!r}")
    for m in module.modules():
        if _convertible_conv(m) or isinstance(m, InvariantConv2d):
            m.__class__ = InvariantConv2d
            m.formulation = conv
            fmt = torch.channels_last if conv == "onednn" else torch.contiguous_format
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        elif type(m) is nn.Linear:
            m.__class__ = InvariantLinear
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
