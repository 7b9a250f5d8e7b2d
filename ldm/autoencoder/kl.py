"""``AutoencoderKL`` (CompVis ``ldm/models/autoencoder.py``): the SD VAE and the LDM kl-f* models.

Keys: ``encoder.*``, ``decoder.*``, ``quant_conv`` (1x1, ``2*z_channels -> 2*embed_dim``),
``post_quant_conv`` (1x1, ``embed_dim -> z_channels``). Training-only parts
(``loss.*``) are not built; the checkpoint loader drops them.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.networks import Decoder, Encoder
from ldm.config import AutoencoderConfig
from ldm_serve.errors import ConfigError


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder with a diagonal Gaussian posterior.

    ``encode``: image in ``[-1, 1]``, ``[B, 3, H, W]`` -> posterior over ``[B, embed_dim, H/f, W/f]``.
    ``decode``: latent ``[B, embed_dim, H/f, W/f]`` -> image ``[B, 3, H, W]``, unclamped (about ``[-1, 1]``).
    The LDM ``scale_factor`` is not applied here; the caller multiplies/divides by it.
    Inputs are cast to the parameters' dtype, and outputs come back in that dtype.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if not config.double_z:
            raise ConfigError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (inputs are cast to it)."""
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior ``q(z | x)`` for images ``x`` in ``[-1, 1]``."""
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))  # [B, 2*embed_dim, H/f, W/f]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image ``[B, out_ch, h*f, w*f]`` from an (unscaled) latent ``z`` ``[B, embed_dim, h, w]``."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))
