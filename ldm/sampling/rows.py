"""A row ready to be denoised: what the engine needs from the pipeline for one image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.sampling.ddim import RowCoefficients

__all__ = ["PreparedRow"]


@dataclass(frozen=True)
class PreparedRow:
    """Everything the engine holds for one row, built by
    :meth:`ldm.pipeline.LatentDiffusionPipeline.prepare_row` (or a test's fake model).

    Attributes:
        x_T: ``[C, h, w]`` float32 starting latent (on the sampling device).
        generator: the row's generator, already past the ``x_T`` (and inpainting) draws;
            every later draw of the row comes from it.
        coef: the row's DDIM schedule (timesteps and coefficients, :mod:`ldm.sampling.ddim`).
        eta: DDIM eta in ``[0, 1]``.
        guidance_scale: the effective classifier-free guidance scale (1 = one UNet pass).
        context: ``[L, D]`` conditioning in the model dtype, or ``None``.
        uncond_context: ``[L, D]`` unconditional counterpart; required when guided.
        c_concat: ``[Cc, h, w]`` concat conditioning (inpainting UNets), or ``None``.
        blend_x0: ``[C, h, w]`` float32 source latent for mask blending, or ``None``.
        blend_keep: ``[1 | C, h, w]`` float32 mask, 1 = keep (with ``blend_x0``).
        start_step: index into ``coef`` of the first step to run (img2img-style rows start
            part-way down the schedule, ``x_T`` being the source noised to that level).
    """

    x_T: torch.Tensor
    generator: torch.Generator | None
    coef: RowCoefficients
    eta: float = 0.0
    guidance_scale: float = 1.0
    context: torch.Tensor | None = None
    uncond_context: torch.Tensor | None = None
    c_concat: torch.Tensor | None = None
    blend_x0: torch.Tensor | None = None
    blend_keep: torch.Tensor | None = None
    start_step: int = 0

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def unet_rows(self) -> int:
        """UNet batch rows this row takes per step (two with guidance: uncond and cond)."""
        return 2 if self.guided else 1
