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
parameters and state dict). The TorchScript backend keeps the kernels (a trace
records them as they are); other backends may rewrite them, so
:func:`is_batch_invariant` is true only for eager and TorchScript modules converted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "InvariantConv2d",
    "InvariantLinear",
    "CONV_FORMULATIONS",
    "im2col_conv2d",
    "invariant_linear",
    "is_batch_invariant",
    "make_batch_invariant",
    "default_kernels",
    "onednn_conv2d",
    "revert_batch_invariant",
]

_MARK = "_ldm_batch_invariant"
_KEEPS_KERNELS = ("eager", "torchscript")  # backends that run the converted graph as it is


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
        elif isinstance(m, InvariantLinear):
            changed.append((m, type(m), None))
            m.__class__ = nn.Linear
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
