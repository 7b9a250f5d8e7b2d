"""``VQModel`` / ``VQModelInterface`` (CompVis ``ldm/models/autoencoder.py``) for the LDM vq-f* models.

LDM diffuses in the *pre-quantization* latent ``h`` (paper App. G); quantization is
folded into decoding, as ``decode_first_stage`` does with ``force_not_quantize=False``.
Keys: ``encoder.*``, ``decoder.*``, ``quant_conv`` (``z_channels -> embed_dim``),
``quantize.embedding.weight`` ``[n_embed, embed_dim]``, ``post_quant_conv``
(``embed_dim -> z_channels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.networks import Decoder, Encoder
from ldm.config import AutoencoderConfig
from ldm_serve.errors import ConfigError


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector lookup by squared L2 distance (inference part of taming's ``VectorQuantizer2``).

    Fully tensorised (``argmin`` + ``embedding``), so it traces and compiles. Distances
    are computed in float32 whatever the codebook dtype, so half-precision weights pick
    the same codes; the returned vectors are exact codebook rows in the codebook's dtype.
    """

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for every position: ``[B, D, h, w] -> [B, h, w]`` (int64)."""
        e = self.embedding.weight.float()  # [N, D]
        z = h.float()  # [B, D, h, w]
        # ||z - e_n||^2 = ||z||^2 + ||e_n||^2 - 2 <z, e_n>, laid out as [B, N, h, w]
        dist = (
            z.pow(2).sum(dim=1, keepdim=True)
            + e.pow(2).sum(dim=1)[None, :, None, None]
            - 2.0 * torch.einsum("bdhw,nd->bnhw", z, e)
        )
        return dist.argmin(dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Replace every ``D``-vector of ``h`` ``[B, D, h, w]`` by its nearest codebook row."""
        idx = self.codes(h)  # [B, h, w]
        # [B, h, w, D] -> [B, D, h, w]; contiguous, else the permuted (channels-last) strides
        # propagate through every conv of the decoder
        return F.embedding(idx, self.embedding.weight).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """Vector-quantised autoencoder.

    ``encode``: image in ``[-1, 1]`` -> pre-quantization latent ``h`` ``[B, embed_dim, H/f, W/f]``.
    ``quantize``: ``h`` -> nearest codebook vectors, same shape.
    ``decode``: ``h`` -> image ``[B, out_ch, H, W]``, always quantizing first (unclamped output).
    Inputs are cast to the parameters' dtype, and outputs come back in that dtype.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.n_embed <= 0:
            raise ConfigError("VQModel needs n_embed > 0 (the codebook size)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (inputs are cast to it)."""
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latent ``h`` for images ``x`` in ``[-1, 1]``."""
        return self.quant_conv(self.encoder(x.to(self.dtype)))  # [B, embed_dim, H/f, W/f]

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Quantize ``h`` ``[B, embed_dim, h, w]``, then ``post_quant_conv`` and the decoder."""
        quant = self.quantize(h.to(self.dtype))
        return self.decoder(self.post_quant_conv(quant))
