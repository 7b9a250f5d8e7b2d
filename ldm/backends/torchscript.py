"""TorchScript backend: ``torch.jit.trace`` + ``torch.jit.freeze``, cached on disk.

The frozen module folds the weights in as constants, so a cached file is the
whole compiled model: on restart it is loaded instead of traced (the cache key
covers weights, config, code, shapes, dtype and torch version; see
:mod:`ldm.backends.cache`). torch marks ``torch.jit`` as deprecated; its warnings
are silenced here, the backend stays for deployments that want a frozen graph
without a compiler toolchain.

Our UNet and decoders trace to graphs that do not depend on the batch size or
the spatial size of the example (``tests/unit/test_backends.py`` checks other
batch sizes and latent sizes against eager).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ldm.backends.cache import atomic_write

__all__ = ["trace_frozen"]


def trace_frozen(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    *,
    device: torch.device,
    path: Path | None = None,
) -> tuple[torch.jit.ScriptModule, bool, float]:
    """A frozen trace of ``module`` on ``example``, loaded from ``path`` when it exists.

    Returns:
        ``(module, loaded_from_cache, seconds)``. A file that cannot be loaded
        (truncated, other torch build) is traced again and overwritten.
    """
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if path is not None and path.is_file():
            try:
                loaded = torch.jit.load(str(path), map_location=device)
                return loaded.eval(), True, time.perf_counter() - t0
            except (RuntimeError, OSError):
                pass  # stale or damaged: rebuild below
        with torch.no_grad():
            traced = torch.jit.trace(module.eval(), tuple(example), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
        if path is not None:
            atomic_write(path, lambda tmp: torch.jit.save(frozen, str(tmp)))
        return frozen, False, time.perf_counter() - t0
