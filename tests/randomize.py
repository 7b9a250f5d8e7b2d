"""Give a freshly built module random, non-degenerate weights.

The original models zero-initialise several output layers (``proj_out``,
``out_layers.3``, ``out.2``); a parity test on zero weights proves nothing, so
tests randomise every parameter and buffer-like float tensor first.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Fill every floating-point parameter of ``module`` in place, deterministically.

    Weight matrices and kernels get ``N(0, scale / fan_in)``; 1-D tensors that are
    norm weights get ``1 + 0.1 * N(0, 1)``; other 1-D tensors (biases) get
    ``0.1 * N(0, 1)``. Embedding tables get ``N(0, 0.5)``.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            if "emb" in name and p.ndim == 2 and "proj" not in name and "linear" not in name:
                std = 0.5
            else:
                std = math.sqrt(scale / max(fan_in, 1))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module
