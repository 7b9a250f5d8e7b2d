"""Sampling maths: the noise-prediction loop over independent rows, no serving concerns.

* :mod:`ldm.sampling.ddim`: one DDIM iteration over rows, each at its own step (coefficients,
  mask blending, update, noise draws).
* :mod:`ldm.sampling.rows`: :class:`PreparedRow`, one row ready to be denoised (what the
  pipeline builds and the continuous-batching engine holds).
* :mod:`ldm.sampling.sampler`: :func:`sample_ddim`, the fixed-batch sampler, and its helpers.

Both :func:`sample_ddim` and :mod:`ldm.engine` run :func:`ldm.sampling.ddim.ddim_iteration`,
so a row's latents are bit-identical whichever drives it. This package imports neither the
engine, the pipeline nor the loaders (``tests/unit/test_layering.py``).
"""

from ldm.sampling.sampler import Denoiser, MaskBlend, StepCallback, StepState, latent_keep_mask, sample_ddim

__all__ = ["Denoiser", "MaskBlend", "StepCallback", "StepState", "latent_keep_mask", "sample_ddim"]
