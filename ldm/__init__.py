"""The latent diffusion model family in pure PyTorch.

UNet, first-stage autoencoders (KL, VQ), conditioning encoders (CLIP, LDM BERT,
class embedding), noise schedules, DDIM sampling and checkpoint loading, all
compatible with the original CompVis / Stable Diffusion checkpoints.

``load_pipeline`` is imported lazily so that ``import ldm.config`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm.pipeline import GenerationResult, GenerationRow, LatentDiffusionPipeline, load_pipeline

__all__ = ["GenerationResult", "GenerationRow", "LatentDiffusionPipeline", "load_pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ldm import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
