"""The tiny test model's UNet and the weight randomizer: one home for tests, benches, presets and the random model.

* :data:`TINY_UNET`: an SD 1-shaped UNet (spatial transformers with a conv ``proj_in``,
  fixed head count) at 32 channels, the smallest that GroupNorm(32) allows. It is the
  UNet of the random untrained model (:mod:`ldm.random_model`), of the ``smoke``
  training preset, of ``bench/model_bench.py``'s ``tiny`` preset and of the tests' SD 1 twin.
* :func:`randomize_weights_`: non-degenerate random weights. The original models
  zero-initialise several output layers (``proj_out``, ``out_layers.3``, ``out.2``),
  which would make an untrained model, or a parity check between two implementations,
  degenerate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.config import UNetConfig

__all__ = ["TINY_UNET", "randomize_unet_weights_", "randomize_weights_"]

TINY_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_heads=2,
    legacy=False,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
)


def _generator(seed: int | torch.Generator, device: torch.device | str | None = None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device="cpu" if device is None else device).manual_seed(seed)


@torch.no_grad()
def randomize_weights_(module: nn.Module, seed: int | torch.Generator = 0, *, scale: float = 1.0) -> nn.Module:
    """Fill every floating-point parameter of ``module`` in place, deterministically.

    Weight matrices and kernels get ``N(0, scale / fan_in)``; 2-D tensors named
    ``*emb*`` (embedding tables, but also Linear layers of a time embedding, see
    :func:`randomize_unet_weights_`) get ``N(0, 0.5²)``; 1-D norm weights get
    ``1 + 0.1 · N(0, 1)``; other 1-D tensors (biases) ``0.1 · N(0, 1)``.

    Args:
        module: the freshly built module.
        seed: an int, or a generator to continue (several modules from one stream).
            Numbers are drawn on the generator's device (a CUDA generator fills a large
            model quickly on its GPU; a CPU one gives the same weights everywhere).
        scale: multiplies the variance of the weight matrices.
    """
    gen = _generator(seed)
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen, device=gen.device)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            if "emb" in name and p.ndim == 2 and "proj" not in name and "linear" not in name:
                std = 0.5
            else:
                std = math.sqrt(scale / max(fan_in, 1))
            p.copy_(noise * std)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return module


@torch.no_grad()
def randomize_unet_weights_(model: nn.Module, seed: int = 0, *, device: torch.device | str | None = None) -> nn.Module:
    """:func:`randomize_weights_` plus fan-in scaled weights on a UNet's time-embedding path.

    ``randomize_weights_`` gives every 2-D tensor whose name contains "emb" the std 0.5 of
    an embedding table, which also hits the Linear layers ``time_embed.*`` and
    ``emb_layers.1``. With 32-channel levels GroupNorm32 has one channel per group, so the
    per-channel embedding added before ``out_layers.0`` cancels exactly and its oversized
    magnitude only turns into amplified fp32 round-off (~5e-4 relative at the output
    instead of ~1e-6; in float64 two implementations agree to 1e-12), and at SD sizes
    it would overflow float16. Returns the model in eval mode.

    Args:
        device: where the numbers are drawn (default the CPU; ``"cuda"`` fills a large
            UNet quickly on its GPU, with other numbers than the CPU's).
    """
    randomize_weights_(model, _generator(seed, device))
    gen = _generator(seed + 1000, device)
    for name, p in model.named_parameters():
        if p.ndim == 2 and (name.startswith("time_embed.") or ".emb_layers." in name):
            p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) / math.sqrt(p.shape[1]))
    return model.eval()
