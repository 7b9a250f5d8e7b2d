"""Kernels chosen for a property the default ones lack (see :mod:`ldm.kernels.batch_invariant`)."""

from ldm.kernels.batch_invariant import (
    CONV_FORMULATIONS,
    InvariantConv2d,
    InvariantCrossAttention,
    InvariantGEGLU,
    InvariantLinear,
    default_kernels,
    im2col_conv2d,
    invariant_linear,
    is_batch_invariant,
    make_batch_invariant,
    onednn_conv2d,
    onednn_linear,
    onednn_linear_mul,
    per_row_linear,
    revert_batch_invariant,
    takes_onednn_linear,
)

__all__ = [
    "CONV_FORMULATIONS",
    "InvariantConv2d",
    "InvariantCrossAttention",
    "InvariantGEGLU",
    "InvariantLinear",
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
