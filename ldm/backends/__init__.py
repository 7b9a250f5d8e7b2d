"""Compiled execution backends for the UNet and the first-stage decoder.

* :func:`compile_unet` / :func:`compile_decoder`: one part on one backend
  (``eager``, ``torchscript``, ``inductor``, ``cudagraphs``, ``tensorrt``);
* :func:`apply_backend`: both parts of a :class:`~ldm.pipeline.LatentDiffusionPipeline`,
  warmed up and swapped in, with a :class:`BackendReport`;
* :mod:`ldm.backends.onnx_export`: ONNX files of both parts (the route to
  TensorRT engines built with ``trtexec``; see ``docs/tensorrt.md``).

Nothing here reads the environment at import time; the inductor cache folder is
set when an inductor backend is built.
"""

from ldm.backends.apply import BackendReport, apply_backend
from ldm.backends.base import (
    BACKENDS,
    Artifact,
    BackendName,
    CompiledDecoder,
    CompiledUNet,
    PaddedRowCounter,
    UNetShapes,
    check_backend,
    resolve_backend,
)
from ldm.backends.compile import DEFAULT_BUCKETS, compile_decoder, compile_unet, example_unet_inputs

__all__ = [
    "BACKENDS",
    "DEFAULT_BUCKETS",
    "Artifact",
    "BackendName",
    "BackendReport",
    "CompiledDecoder",
    "CompiledUNet",
    "PaddedRowCounter",
    "UNetShapes",
    "apply_backend",
    "check_backend",
    "compile_decoder",
    "compile_unet",
    "example_unet_inputs",
    "resolve_backend",
]
