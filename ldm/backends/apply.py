"""Put a pipeline's UNet and decoder on an execution backend, warmed up.

:func:`apply_backend` compiles both parts, warms them up for the image sizes the
worker will serve (so compilation and graph capture happen before it reports
ready), and swaps them into the pipeline:

* ``pipeline.model`` becomes a copy of the :class:`~ldm.loading.loader.LoadedModel` whose
  ``unet`` is the :class:`~ldm.backends.base.CompiledUNet` and whose
  ``first_stage`` is a shallow copy of the original with the compiled ``decode``
  in its instance dictionary. The copy shares every submodule, so ``encode``
  (inpainting), ``isinstance`` checks and ``parameters()`` keep working, and
  other pipelines sharing the original ``LoadedModel`` are not affected.
* :meth:`BackendReport.restore` puts the original model back.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm.backends.base import (
    Artifact,
    BackendName,
    CompiledDecoder,
    CompiledUNet,
    PaddedRowCounter,
    UNetShapes,
    check_backend,
)
from ldm.backends.cache import file_identity
from ldm.backends.compile import DEFAULT_BUCKETS, compile_decoder, compile_unet, example_unet_inputs
from ldm.kernels import revert_batch_invariant
from ldm_serve.errors import ConfigError

if TYPE_CHECKING:
    from ldm.loading.loader import LoadedModel
    from ldm.pipeline import LatentDiffusionPipeline

__all__ = ["BackendReport", "apply_backend"]


@dataclass
class BackendReport:
    """What :func:`apply_backend` did.

    Attributes:
        backend: the backend now in use.
        device, dtype: where the model runs.
        artifacts: every compiled / loaded piece, with cache hits and timings.
        padded_rows: rows added by batch bucketing (export as ``ldm_engine_padded_rows_total``).
        warmed_up: image sizes ``(width, height)`` compiled / captured ahead of time.
        seconds: wall time of compilation plus warm-up.
    """

    backend: str
    device: str
    dtype: str
    artifacts: list[Artifact] = field(default_factory=list)
    padded_rows: PaddedRowCounter = field(default_factory=PaddedRowCounter)
    warmed_up: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    _pipeline: LatentDiffusionPipeline | None = field(default=None, repr=False)
    _original: LoadedModel | None = field(default=None, repr=False)

    @property
    def loaded_from_cache(self) -> bool:
        """True when every cacheable artifact came from the on-disk cache."""
        cached = [a for a in self.artifacts if a.path is not None]
        return bool(cached) and all(a.loaded_from_cache for a in cached)

    def summary(self) -> str:
        """One log line."""
        parts = ", ".join(
            f"{a.part} {a.seconds:.1f}s{' (cache)' if a.loaded_from_cache else ''}" for a in self.artifacts
        )
        return f"backend {self.backend} on {self.device}/{self.dtype}: {parts or 'nothing compiled'}"

    def restore(self) -> None:
        """Put the eager model back into the pipeline."""
        if self._pipeline is not None and self._original is not None:
            self._pipeline.model = self._original
            self._pipeline = None


def _context_len(pipeline: LatentDiffusionPipeline) -> int:
    if pipeline.is_text_conditional:
        return int(pipeline.max_prompt_tokens)
    return 1  # class embedding: [B, 1, D]


def apply_backend(
    pipeline: LatentDiffusionPipeline,
    backend: BackendName | str,
    *,
    cache_dir: str | Path | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    decoder_buckets: Sequence[int] | None = None,
    warmup_sizes: Sequence[tuple[int, int]] = (),
    channels_last: bool | None = None,
    inductor_mode: str | None = None,
) -> BackendReport:
    """Run ``pipeline``'s UNet and decoder on ``backend`` (see :mod:`ldm.backends.compile`).

    Args:
        pipeline: a loaded pipeline; its modules stay where they are.
        backend: ``eager`` leaves the pipeline as it is.
        cache_dir: artifact cache (TorchScript files, inductor / Triton / TensorRT caches).
        buckets: UNet / decoder batch sizes captured as CUDA graphs (in UNet rows, so
            a guided image counts twice); larger batches run in chunks.
        decoder_buckets: the decoder's batch sizes (images), default ``buckets``.
        warmup_sizes: ``(width, height)`` image sizes to compile / capture now; the
            model's default size is always warmed up.
        channels_last, inductor_mode: see :func:`~ldm.backends.compile.compile_unet`.

    Raises:
        ConfigError: the backend cannot run here (see :func:`~ldm.backends.compile.compile_unet`),
            or the pipeline is already compiled.
        InvalidInput: a warm-up size the model cannot generate.
    """
    name = check_backend(backend)
    t0 = time.perf_counter()
    report = BackendReport(
        backend=name, device=str(pipeline.device), dtype=str(pipeline.dtype).removeprefix("torch.")
    )
    if name == "eager":
        return report
    original = pipeline.model
    if isinstance(original.unet, CompiledUNet):
        raise ConfigError(
            f"the pipeline already runs on the {original.unet.backend!r} backend; restore() its report first"
        )
    sizes = list(dict.fromkeys([(pipeline.default_size, pipeline.default_size), *warmup_sizes]))
    for w, h in sizes:
        pipeline.validate_size(w, h)
    source = Path(original.source)
    weights_id = file_identity(source) if source.exists() else None
    f = pipeline.downsample_factor
    w0, h0 = sizes[0]
    common = {
        "cache_dir": cache_dir,
        "weights_id": weights_id,
        "buckets": buckets,
        "padded_rows": report.padded_rows,
        "channels_last": channels_last,
        "inductor_mode": inductor_mode,
    }
    shapes = UNetShapes(batch=1, height=h0 // f, width=w0 // f, context_len=_context_len(pipeline))
    if name not in ("eager", "torchscript"):
        # other compilers get the plain kernels, in place (no second copy of the weights); batch
        # invariance then comes from one-row calls again (ldm.kernels.is_batch_invariant is false)
        revert_batch_invariant(original.unet)
        revert_batch_invariant(original.first_stage)
    unet = compile_unet(original.unet, name, shapes=shapes, **common)
    first_stage = original.first_stage
    latent = (1, first_stage.config.embed_dim, h0 // f, w0 // f)
    dec_buckets = buckets if decoder_buckets is None else decoder_buckets
    decoder = compile_decoder(first_stage, name, latent_shape=latent, **(common | {"buckets": dec_buckets}))
    report.artifacts = [*unet.artifacts, *decoder.artifacts]

    _warm_up(pipeline, unet, decoder, sizes, buckets, dec_buckets)
    report.warmed_up = sizes

    wrapped_fs = copy.copy(first_stage)  # new __dict__, shared submodules and parameters
    object.__setattr__(wrapped_fs, "decode", decoder)  # instance attribute shadows the class method
    pipeline.model = dataclasses.replace(original, unet=unet, first_stage=wrapped_fs)
    report._pipeline, report._original = pipeline, original
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def _warm_up(
    pipeline: LatentDiffusionPipeline,
    unet: CompiledUNet,
    decoder: CompiledDecoder,
    sizes: Sequence[tuple[int, int]],
    buckets: Sequence[int],
    decoder_buckets: Sequence[int],
) -> None:
    """Call both parts at every size (and, when bucketed, every bucket) once."""
    f = pipeline.downsample_factor
    embed_dim = pipeline.config.first_stage.embed_dim
    bucketed = unet.padded_rows is not None and not pipeline.batch_invariant
    # TorchScript's profiling executor optimises a graph for a shape on its first calls
    calls = 3 if unet.backend == "torchscript" else 1
    for w, h in sizes:
        for b in sorted(set(buckets)) if bucketed else [1]:
            shapes = UNetShapes(batch=b, height=h // f, width=w // f, context_len=_context_len(pipeline))
            x, t, *extra = example_unet_inputs(unet.eager, shapes, pipeline.device, pipeline.dtype)
            for _ in range(calls):
                unet(x, t, **dict(zip(unet.input_names[2:], extra, strict=True)))
        for b in sorted(set(decoder_buckets)) if bucketed else [1]:
            z = torch.zeros((b, embed_dim, h // f, w // f), device=pipeline.device)  # [b, C, h, w]
            for _ in range(calls):
                decoder(z)
