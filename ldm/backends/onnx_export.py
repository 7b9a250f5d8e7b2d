"""ONNX export of the UNet and the first-stage decoder (dynamic batch).

The files are the route to TensorRT engines built with ``trtexec`` in the worker
image (``docs/tensorrt.md``) and can run anywhere onnxruntime does. Inputs and
outputs are named for the engine builder:

* UNet: ``x [batch, C_in, h, w]``, ``timesteps [batch]`` (int64), then
  ``context [batch, L, D]`` and/or ``y [batch]`` (int64) -> ``eps [batch, C_out, h, w]``;
* decoder: ``z [batch, C, h, w]`` -> ``image [batch, 3, H, W]`` (unscaled latent in,
  ``[-1, 1]`` image out, as ``first_stage.decode``).

``batch`` is the only dynamic axis; ``h``, ``w`` and ``L`` are those of the export
shapes (export again, or let the cache key do it, for another image size).

:func:`export_pipeline_onnx` writes both files for a pipeline into a folder keyed
like the other artifacts (weights, config, code, shapes, dtype, torch version) and
reuses them when they are already there. :func:`run_onnx` runs a file with
onnxruntime on the CPU. Needs the ``onnx`` extra (``onnx``, ``onnxruntime``,
``onnxscript``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.backends.base import DecoderCall, UNetCall, UNetShapes, unet_input_names
from ldm.backends.cache import artifact_key, atomic_write, file_identity
from ldm.backends.compile import example_unet_inputs
from ldm.kernels import default_kernels
from ldm_serve.errors import ConfigError

if TYPE_CHECKING:
    from ldm.pipeline import LatentDiffusionPipeline

__all__ = [
    "Exporter",
    "OnnxExport",
    "check_pipeline_onnx",
    "export_decoder_onnx",
    "export_pipeline_onnx",
    "export_unet_onnx",
    "run_onnx",
]

Exporter = Literal["dynamo", "torchscript"]
"""``dynamo``: ``torch.export``-based exporter (needs onnxscript); ``torchscript``: the
older tracing exporter (deprecated by torch, faster to run, kept as a fallback)."""

MAX_BATCH = 64


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ConfigError(
            f"ONNX export / checking needs the {module} package: pip install 'ldm-serve[onnx]'"
        ) from exc


@contextlib.contextmanager
def _four_dim_attention() -> Iterator[None]:
    """Give 3-D ``scaled_dot_product_attention`` calls a singleton head axis while exporting.

    onnxscript translates SDPA only for ``[B, heads, N, d]`` inputs; the autoencoder's
    one-head attention calls it on ``[B, N, C]``. ``[B, 1, N, C]`` is the same math.
    """
    original = F.scaled_dot_product_attention

    def sdpa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object
    ) -> torch.Tensor:
        if q.dim() != 3:
            return original(q, k, v, *args, **kwargs)
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            kwargs["attn_mask"] = mask[:, None]
        return original(q[:, None], k[:, None], v[:, None], *args, **kwargs)[:, 0]  # [B, N, C]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_name: str,
    exporter: Exporter,
    opset: int | None,
) -> Path:
    """Export ``module(*args)`` to ``path`` with a dynamic first axis on every input and the output."""
    if exporter == "dynamo":
        _require("onnxscript")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, object] = {"input_names": list(input_names), "output_names": [output_name]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        kwargs |= {"dynamo": True, "dynamic_shapes": tuple({0: batch} for _ in args), "verbose": False}
    else:
        axes = {n: {0: "batch"} for n in [*input_names, output_name]}
        kwargs |= {"dynamo": False, "dynamic_axes": axes}

    def write(tmp: Path) -> None:
        # ONNX has no mkldnn_convolution: export the plain layers (same weights), then convert back
        with warnings.catch_warnings(), torch.no_grad(), _four_dim_attention(), default_kernels(module):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, str(tmp), **kwargs)

    if exporter == "dynamo":
        # large models keep their weights in a side file named after the target: write in place
        write(path)
    else:
        atomic_write(path, write)
    return path


def export_unet_onnx(
    unet: nn.Module,
    path: str | Path,
    *,
    shapes: UNetShapes = UNetShapes(batch=2),
    exporter: Exporter = "dynamo",
    opset: int | None = None,
) -> Path:
    """Export a ``UNetModel`` (on its device and dtype) to ``path``; returns ``path``."""
    param = next(unet.parameters())
    args = tuple(example_unet_inputs(unet, shapes, param.device, param.dtype))
    names = unet_input_names(unet)
    return _export(
        UNetCall(unet), args, Path(path), input_names=names, output_name="eps", exporter=exporter, opset=opset
    )


def export_decoder_onnx(
    first_stage: nn.Module,
    path: str | Path,
    *,
    latent_shape: Sequence[int] | None = None,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
) -> Path:
    """Export ``first_stage.decode`` (KL or VQ) to ``path``; returns ``path``.

    ``latent_shape`` is the example ``[B, C, h, w]`` (default ``[2, embed_dim, 8, 8]``).
    """
    param = next(first_stage.parameters())
    shape = tuple(latent_shape) if latent_shape is not None else (2, first_stage.config.embed_dim, 8, 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    return _export(
        DecoderCall(first_stage), (z,), Path(path), input_names=["z"], output_name="image", exporter=exporter,
        opset=opset,
    )  # fmt: skip


@dataclass(frozen=True)
class OnnxExport:
    """The two files of a pipeline export and whether they were already there."""

    unet: Path
    decoder: Path
    meta: Path
    loaded_from_cache: bool


def export_pipeline_onnx(
    pipeline: LatentDiffusionPipeline,
    out_dir: str | Path,
    *,
    width: int | None = None,
    height: int | None = None,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    keyed: bool = True,
) -> OnnxExport:
    """Export ``pipeline``'s UNet and decoder for ``width`` x ``height`` images.

    With ``keyed`` the files go to ``out_dir/<key>/`` (the cache key of
    :mod:`ldm.backends.cache`) and an existing complete export is reused;
    otherwise straight into ``out_dir`` (overwritten). A ``model.json`` beside them
    records the input names and shapes for ``trtexec`` profiles.
    """
    width = width or pipeline.default_size
    height = height or pipeline.default_size
    pipeline.validate_size(width, height)
    f = pipeline.downsample_factor
    context_len = pipeline.max_prompt_tokens if pipeline.is_text_conditional else 1
    shapes = UNetShapes(batch=2, height=height // f, width=width // f, context_len=context_len)
    model = pipeline.model
    unet, first_stage = model.unet, model.first_stage
    unet = getattr(unet, "eager", unet)  # a CompiledUNet exports its eager module
    latent = (2, first_stage.config.embed_dim, height // f, width // f)
    folder = Path(out_dir)
    if keyed:
        source = Path(model.source)
        key = artifact_key(
            part="onnx", backend=exporter, module=unet,
            weights_id=file_identity(source) if source.exists() else None,
            shapes=(shapes, latent, opset), dtype=pipeline.dtype, device=pipeline.device,
        )  # fmt: skip
        folder = folder / key
    paths = OnnxExport(folder / "unet.onnx", folder / "decoder.onnx", folder / "model.json", False)
    if keyed and all(p.is_file() for p in (paths.unet, paths.decoder, paths.meta)):
        return dataclasses.replace(paths, loaded_from_cache=True)
    export_unet_onnx(unet, paths.unet, shapes=shapes, exporter=exporter, opset=opset)
    export_decoder_onnx(first_stage, paths.decoder, latent_shape=latent, exporter=exporter, opset=opset)
    unet_inputs = example_unet_inputs(unet, shapes, pipeline.device, pipeline.dtype)
    meta = {
        "model": pipeline.name,
        "family": pipeline.config.family,
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "image_size": [width, height],
        "unet": {
            "inputs": _describe(unet_input_names(unet), unet_inputs),
            "output": "eps",
        },
        "decoder": {"inputs": {"z": ["batch", *latent[1:]]}, "output": "image"},
        "exporter": exporter,
        "torch": torch.__version__,
    }
    atomic_write(
        paths.meta, lambda tmp: tmp.write_text(json.dumps(meta, indent=2))
    )  # written last: marks completion
    return paths


def _describe(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, list[object]]:
    return {n: ["batch", *t.shape[1:]] for n, t in zip(names, tensors, strict=True)}


def run_onnx(path: str | Path, inputs: Sequence[torch.Tensor], *, threads: int | None = None) -> torch.Tensor:
    """Run an exported file with onnxruntime on the CPU; inputs in the file's input order."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        spec.name: np.ascontiguousarray(t.detach().cpu().numpy())
        for spec, t in zip(session.get_inputs(), inputs, strict=True)
    }
    return torch.from_numpy(session.run(None, feeds)[0])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def check_pipeline_onnx(
    pipeline: LatentDiffusionPipeline, export: OnnxExport, *, batch: int = 3
) -> dict[str, float]:
    """Max relative error of onnxruntime (CPU) vs the eager modules, per part, at ``batch`` rows
    (a batch size other than the export's, so the dynamic axis is exercised too)."""
    meta = json.loads(export.meta.read_text())
    width, height = meta["image_size"]
    f = pipeline.downsample_factor
    unet = getattr(pipeline.model.unet, "eager", pipeline.model.unet)
    first_stage = pipeline.model.first_stage
    context_len = pipeline.max_prompt_tokens if pipeline.is_text_conditional else 1
    shapes = UNetShapes(batch=batch, height=height // f, width=width // f, context_len=context_len)
    inputs = example_unet_inputs(unet, shapes, pipeline.device, pipeline.dtype)
    eager_unet = UNetCall(unet)(*inputs)
    z = torch.randn(
        (batch, first_stage.config.embed_dim, height // f, width // f),
        generator=torch.Generator().manual_seed(1),
    )
    z = z.to(pipeline.device, pipeline.dtype)
    eager_image = DecoderCall(first_stage)(z)
    return {
        "unet": _rel_err(run_onnx(export.unet, inputs), eager_unet.cpu()),
        "decoder": _rel_err(run_onnx(export.decoder, [z]), eager_image.cpu()),
    }
