"""Inductor backend: ``torch.compile(fullgraph=True)``.

Compilation happens on the first call for each new input shape, so callers warm
up before serving (:func:`ldm.backends.apply_backend` does). With a cache folder,
``TORCHINDUCTOR_CACHE_DIR`` is pointed at ``<cache_dir>/inductor`` when the backend
is built (never at import time): inductor's FX-graph cache and, on GPUs, Triton's
kernel cache then survive restarts, and a restarted worker skips code generation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["compile_inductor", "inductor_cache_hits", "use_inductor_cache_dir"]


def use_inductor_cache_dir(cache_dir: Path) -> Path:
    """Point inductor (and Triton, which lives under it) at ``cache_dir / "inductor"``."""
    target = (cache_dir / "inductor").resolve()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    return target


def inductor_cache_hits() -> int:
    """FX-graph cache hits so far in this process (0 if torch does not count them)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_hit"])
    except Exception:  # private API: absent or renamed in other torch versions
        return 0


def compile_inductor(
    module: nn.Module, *, cache_dir: Path | None = None, mode: str | None = None
) -> Callable[..., torch.Tensor]:
    """``torch.compile(module, fullgraph=True)`` with our cache folder.

    ``mode`` is passed to ``torch.compile`` (``None``: inductor's default; use
    ``"max-autotune-no-cudagraphs"`` for longer tuning on GPUs). CUDA graphs are
    not requested here: the CUDA path wraps the compiled function in our bucketed
    graphs (:mod:`ldm.backends.cudagraphs`).
    """
    if cache_dir is not None:
        use_inductor_cache_dir(cache_dir)
    return torch.compile(module, fullgraph=True, mode=mode)
