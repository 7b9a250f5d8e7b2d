"""Diagonal Gaussian posterior of the KL autoencoder (``ldm/modules/distributions/distributions.py``)."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """``N(mean, exp(logvar))`` per latent element, from the encoder's stacked moments.

    Args:
        parameters: ``[B, 2*embed_dim, h, w]``, mean in the first half of the channels,
            log-variance in the second (the layout of ``quant_conv``'s output).

    ``logvar`` is clamped to ``[-30, 20]`` as in the original.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # each [B, embed_dim, h, w]
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``.

        The noise is drawn on the generator's device (so a CPU generator gives the
        same latent on every device) in the mean's dtype, then moved to the mean's device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. ``mean``."""
        return self.mean
