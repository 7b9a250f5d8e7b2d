"""Hard limits of a generation request that hold for every model: one source for both sides.

The gateway's request schema (``service/schemas.py``), the seeds it draws, the settings'
upper bounds and the model's own row validation (``ldm/pipeline.py``) all read these
constants, so the gateway never accepts a value the model would refuse. Limits that depend
on the model (size multiple, step counts its timestep spacing refuses, guidance of an
unconditional model, inpainting support) are advertised by each worker instead
(:class:`ldm_serve.contract.ModelConstraints`, checked by :mod:`ldm_serve.model_limits`).

Torch-free and pydantic-free: ``ldm/`` may import this module (see docs/architecture.md).
"""

from __future__ import annotations

SEED_MAX = 2**32 - 1
"""Largest seed (seeds are drawn and wrapped in ``[0, 2**32)``, as the original scripts do)."""

GUIDANCE_SCALE_MAX = 50.0
"""Largest classifier-free guidance scale a model accepts; ``Settings.max_guidance_scale`` may lower it."""

ETA_MAX = 1.0
"""DDIM eta lies in ``[0, ETA_MAX]`` (0 = deterministic DDIM, 1 = DDPM-like noise)."""

MAX_SIDE = 4096
"""Largest image side in pixels any model is asked to produce."""

STRENGTH_DEFAULT = 0.75
"""img2img ``strength`` when the request gives none (as the original ``scripts/img2img.py``)."""


def img2img_steps(steps: int, strength: float) -> int:
    """How many of a ``steps``-step DDIM schedule an img2img row runs at ``strength`` in (0, 1].

    SDEdit as the original ``scripts/img2img.py`` and diffusers' img2img pipeline: the
    source is noised to the step ``strength`` selects and the last
    ``min(int(steps * strength), steps)`` steps are run (0 means no step: refused).
    ``steps`` is the schedule's real length (``ldm.noise_schedule.ddim_step_count``).
    """
    return min(int(steps * float(strength)), steps)
