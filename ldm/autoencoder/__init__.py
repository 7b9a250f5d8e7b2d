"""First-stage autoencoders of latent diffusion, checkpoint-compatible with CompVis ``ldm``.

``build_first_stage(config)`` returns an ``AutoencoderKL`` (``kind="kl"``) or a
``VQModel`` (``kind="vq"``) whose state-dict keys equal those under the original
checkpoints' ``first_stage_model.`` prefix (minus the training-only ``loss.*``).
"""

from __future__ import annotations

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.kl import AutoencoderKL
from ldm.autoencoder.vq import VectorQuantizer, VQModel
from ldm.config import AutoencoderConfig
from ldm_serve.errors import ConfigError

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussianDistribution",
    "VQModel",
    "VectorQuantizer",
    "build_first_stage",
]

_ATTN_TYPES = ("vanilla", "none")


def build_first_stage(config: AutoencoderConfig) -> AutoencoderKL | VQModel:
    """Build the first-stage model described by ``config`` (default-initialised weights, ready for a checkpoint).

    Raises:
        ConfigError: unknown ``kind`` or ``attn_type`` (e.g. ``"linear"``), or an option
            the chosen model cannot take (``double_z: false`` for KL, ``n_embed <= 0`` for VQ).
    """
    if config.attn_type not in _ATTN_TYPES:
        raise ConfigError(f"first stage attn_type {config.attn_type!r} is not supported (use one of {_ATTN_TYPES})")
    if config.kind == "kl":
        return AutoencoderKL(config)
    if config.kind == "vq":
        return VQModel(config)
    raise ConfigError(f"unknown first stage kind {config.kind!r} (expected 'kl' or 'vq')")
