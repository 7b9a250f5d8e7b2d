"""The layer calls a model makes, recorded from a real run: the shapes batch invariance must hold for.

Tests and ``bench/kernel_bench.py`` take the convolution, linear, attention and
normalization calls from the module trees this way instead of listing shapes by hand,
so a new layer or a new model size is covered by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LayerCall", "record_layer_calls", "row_batch"]


@dataclass
class LayerCall:
    """One call of ``module`` with the recorded (one-row) tensors ``args``."""

    name: str
    module: nn.Module
    args: tuple[Any, ...]

    def signature(self) -> tuple:
        """Type, configuration and input shapes: calls with equal signatures compute the same way."""
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in self.args)
        return type(self.module).__name__, repr(self.module), shapes


def record_layer_calls(
    roots: Iterable[nn.Module], run: Callable[[], object], kinds: tuple[type, ...]
) -> list[LayerCall]:
    """Run ``run()``; the first call of each distinct signature of a ``kinds`` layer under ``roots``."""
    calls: dict[tuple, LayerCall] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            call = LayerCall(name, module, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                                 for a in args))  # fmt: skip
            calls.setdefault(call.signature(), call)

        return record

    for root in roots:
        for name, m in root.named_modules():
            if isinstance(m, kinds):
                handles.append(m.register_forward_pre_hook(hook(f"{type(root).__name__}.{name}")))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return list(calls.values())


def row_batch(args: tuple[Any, ...], rows: int, generator: torch.Generator) -> tuple[Any, ...]:
    """``rows``-row random inputs shaped like one-row ``args`` (floats ~ N(0, 1); other tensors repeated)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.append(torch.randn((rows, *a.shape[1:]), generator=generator, dtype=a.dtype))
        elif isinstance(a, torch.Tensor):
            out.append(a[:1].expand(rows, *a.shape[1:]).clone())
        else:
            out.append(a)
    return tuple(out)
