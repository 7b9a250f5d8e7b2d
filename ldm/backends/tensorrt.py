"""TensorRT backend through torch-tensorrt (optional dependency, CUDA only).

torch-tensorrt builds TensorRT engines from the exported graph, for a range of
batch sizes (min / opt / max profile). Engines are cached in
``<cache_dir>/tensorrt`` with torch-tensorrt's own engine cache when the
installed version supports it. The other route to TensorRT, ONNX files built
into engines with ``trtexec`` in the worker image, is in :mod:`ldm.backends.onnx_export`
and ``docs/tensorrt.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ldm_serve.errors import ConfigError

__all__ = ["compile_tensorrt", "require_torch_tensorrt"]


def require_torch_tensorrt() -> ModuleType:
    """Import ``torch_tensorrt`` or raise :class:`ConfigError` naming the package."""
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise ConfigError(
            "the 'tensorrt' backend needs the torch_tensorrt package (pip install torch-tensorrt, "
            "the build matching your torch and CUDA), which is not installed; use the 'inductor' or "
            "'cudagraphs' backend, or build engines from ONNX with trtexec (docs/tensorrt.md)"
        ) from exc


def compile_tensorrt(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype,
    max_batch: int,
    cache_dir: Path | None = None,
) -> Callable[..., torch.Tensor]:
    """Compile ``module`` for inputs shaped like ``example`` with batch 1 ... ``max_batch``.

    Raises:
        ConfigError: torch_tensorrt is not installed, or the module is not on a CUDA device.
    """
    trt = require_torch_tensorrt()
    device = example[0].device
    if device.type != "cuda":
        raise ConfigError(f"the 'tensorrt' backend needs a CUDA device, the model is on {device}")
    opt = max(1, example[0].shape[0])
    inputs = [
        trt.Input(
            min_shape=(1, *t.shape[1:]),
            opt_shape=(min(opt, max_batch), *t.shape[1:]),
            max_shape=(max_batch, *t.shape[1:]),
            dtype=t.dtype,
        )
        for t in example
    ]
    kwargs: dict[str, object] = {"ir": "dynamo", "arg_inputs": inputs, "enabled_precisions": {dtype}}
    if cache_dir is not None:
        engine_dir = cache_dir / "tensorrt"
        engine_dir.mkdir(parents=True, exist_ok=True)
        cached = kwargs | {
            "cache_built_engines": True,
            "reuse_cached_engines": True,
            "engine_cache_dir": str(engine_dir),
        }
        try:
            return trt.compile(module.eval(), **cached)
        except TypeError:  # a torch-tensorrt without these options: build without the cache
            pass
    return trt.compile(module.eval(), **kwargs)
