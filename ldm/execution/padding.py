"""Padding a UNet call to a fixed batch size (bucketed shapes for compiled / graph-captured UNets)."""

from __future__ import annotations

import torch

from ldm.denoiser import UNetCallable

__all__ = ["PaddedUNet"]


class PaddedUNet:
    """Calls ``unet`` on a batch padded to ``size`` rows and returns the real rows only.

    Padded rows repeat the last real row (valid inputs, so no NaNs can appear) and
    their outputs are dropped. A batch already at or above ``size`` is passed through.
    """

    def __init__(self, unet: UNetCallable, size: int) -> None:
        self.unet = unet
        self.size = size

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = x.shape[0]
        pad = self.size - rows
        if pad <= 0:
            return self.unet(x, timesteps, context=context, y=y)

        def padded(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])

        out = self.unet(padded(x), padded(timesteps), context=padded(context), y=padded(y))  # [size, C, h, w]
        return out[:rows]
