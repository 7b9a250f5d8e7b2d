"""Kernels chosen for a property the default ones lack (see :mod:`ldm.kernels.batch_invariant`)."""

from ldm.kernels.batch_invariant import (
    InvariantConv2d,
    InvariantLinear,
    invariant_conv2d,
    invariant_linear,
    is_batch_invariant,
    make_batch_invariant,
)

__all__ = [
    "InvariantConv2d",
    "InvariantLinear",
    "invariant_conv2d",
    "invariant_linear",
    "is_batch_invariant",
    "make_batch_invariant",
]
