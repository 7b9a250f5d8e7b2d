"""Optimizer and learning-rate schedule shared by both training stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["learning_rate", "make_optimizer", "set_learning_rate"]


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction * base_lr`` at ``total_steps``.

    ``step`` counts from 0; steps past ``total_steps`` keep the final rate (a resumed
    run asked for more steps simply continues at the end of its own schedule).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.999); the rate is set per step by :func:`set_learning_rate`."""
    return torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
