"""``compile_unet`` and ``compile_decoder``: one entry point per part, any backend.

Backends and devices:

=============  =====  ====  ==================================================
backend        CPU    CUDA  what runs
=============  =====  ====  ==================================================
eager          yes    yes   the module as written (SDPA picks flash attention
                            on CUDA for fp16 / bf16 by itself)
torchscript    yes    yes   ``torch.jit.trace`` + ``freeze``, file-cached
inductor       yes    yes   ``torch.compile``; on CUDA inside bucketed CUDA
                            graphs, channels_last by default
cudagraphs     no     yes   the eager module captured per batch bucket
tensorrt       no     yes   torch-tensorrt engines (optional package)
=============  =====  ====  ==================================================

Asking for a CUDA-only backend on the CPU, or for ``tensorrt`` without
torch-tensorrt installed, raises :class:`~ldm_serve.errors.ConfigError` saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ldm.backends.base import (
    Artifact,
    BackendName,
    CompiledDecoder,
    CompiledUNet,
    DecoderCall,
    PaddedRowCounter,
    UNetCall,
    UNetShapes,
    check_backend,
    check_device_dtype,
    unet_input_names,
)
from ldm.backends.cache import artifact_key
from ldm.backends.cudagraphs import BucketedRunner, CudaGraphRunner, check_buckets
from ldm.backends.inductor import compile_inductor, inductor_cache_hits, use_inductor_cache_dir
from ldm.backends.tensorrt import compile_tensorrt, require_torch_tensorrt
from ldm.backends.torchscript import trace_frozen
from ldm_serve.errors import ConfigError

__all__ = ["DEFAULT_BUCKETS", "compile_decoder", "compile_unet", "example_unet_inputs"]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16)


def example_unet_inputs(
    unet: nn.Module, shapes: UNetShapes, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Random inputs in :class:`~ldm.backends.base.UNetCall` order for ``shapes``."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    b = shapes.batch
    inputs = [
        torch.randn((b, cfg.in_channels, shapes.height, shapes.width), generator=gen).to(device, dtype),  # x
        torch.randint(0, 1000, (b,), generator=gen).to(device),  # timesteps, int64
    ]
    for name in unet_input_names(unet)[2:]:
        if name == "context":  # [B, L, D]
            inputs.append(
                torch.randn((b, shapes.context_len, cfg.context_dim), generator=gen).to(device, dtype)
            )
        else:  # y: [B] class labels
            inputs.append(torch.randint(0, cfg.num_classes, (b,), generator=gen).to(device))
    return inputs


def _check_runs_here(backend: BackendName, device: torch.device) -> None:
    if backend == "tensorrt":
        require_torch_tensorrt()  # the missing package is the first thing to report
    if backend in ("cudagraphs", "tensorrt") and device.type != "cuda":
        raise ConfigError(
            f"the {backend!r} backend needs a CUDA device; the model is on {device} "
            "(use 'eager', 'torchscript' or 'inductor' there)"
        )


def _bucketed_graphs(fn: Callable[..., torch.Tensor], buckets: Sequence[int], counter: PaddedRowCounter):
    pool = torch.cuda.graph_pool_handle()
    return BucketedRunner(lambda size, ex: CudaGraphRunner(fn, size, ex, pool=pool), buckets, counter)


def _build(
    part: str,
    module: nn.Module,
    example: list[torch.Tensor],
    backend: BackendName,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None,
    weights_id: str | None,
    buckets: tuple[int, ...],
    counter: PaddedRowCounter,
    cuda_graphs: bool,
    inductor_mode: str | None,
    key_shapes: object,
    key_module: nn.Module,
) -> tuple[Callable[..., torch.Tensor], Artifact]:
    """The compiled callable for ``module`` (a UNetCall / DecoderCall) and what was done."""
    art = Artifact(part=part, backend=backend)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    if backend == "eager":
        fn: Callable[..., torch.Tensor] = module
    elif backend == "torchscript":
        path = None
        if cache_dir is not None:
            key = artifact_key(
                part=part, backend=backend, module=key_module, weights_id=weights_id,
                shapes=key_shapes, dtype=dtype, device=device,
            )  # fmt: skip
            path = cache_dir / "torchscript" / f"{part}-{key}.pt"
        fn, art.loaded_from_cache, _ = trace_frozen(module, example, device=device, path=path)
        art.path = path
    elif backend == "inductor":
        art.path = use_inductor_cache_dir(cache_dir) if cache_dir is not None else None
        fn = compile_inductor(module, mode=inductor_mode)
    elif backend == "cudagraphs":
        fn = module
    else:  # tensorrt
        art.path = cache_dir / "tensorrt" if cache_dir is not None else None
        fn = compile_tensorrt(module, example, dtype=dtype, max_batch=buckets[-1], cache_dir=cache_dir)
    if cuda_graphs:
        fn = _bucketed_graphs(fn, buckets, counter)
        art.note = f"CUDA graphs per batch bucket {list(buckets)}"
    if backend in ("inductor", "cudagraphs", "tensorrt"):  # compile / capture now, not on the first request
        hits, padded = inductor_cache_hits(), counter.value
        with torch.no_grad():
            fn(*example)
        counter.add(padded - counter.value)  # warm-up padding is not traffic
        if backend == "inductor":
            art.loaded_from_cache = inductor_cache_hits() > hits
    art.seconds = time.perf_counter() - t0
    return fn, art


def _graphs_wanted(backend: BackendName, device: torch.device, cuda_graphs: bool | None) -> bool:
    if backend == "cudagraphs":
        return True
    if cuda_graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device; the model is on {device}")
    if cuda_graphs is None:  # default: graphs around inductor's kernels on CUDA
        return backend == "inductor" and device.type == "cuda"
    return cuda_graphs


def compile_unet(
    unet: nn.Module,
    backend: BackendName | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    shapes: UNetShapes = UNetShapes(),
    cache_dir: str | Path | None = None,
    weights_id: str | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    padded_rows: PaddedRowCounter | None = None,
    channels_last: bool | None = None,
    cuda_graphs: bool | None = None,
    inductor_mode: str | None = None,
) -> CompiledUNet:
    """Compile a ``UNetModel`` for ``backend``; the result is called like the UNet.

    Args:
        unet: the eager UNet, already on its device and dtype (eval mode).
        backend: see the module docstring.
        device, dtype: optional checks that the UNet is where the caller expects.
        shapes: example input sizes (latent space) for tracing and the first
            compile / capture; other sizes still work (traced graphs are size-generic,
            compiled and graphed ones compile / capture a new shape on first sight).
        cache_dir: where artifacts persist between restarts (``None``: nothing cached).
        weights_id: identity of the weights (e.g. :func:`~ldm.backends.cache.file_identity`
            of the checkpoint); ``None`` hashes the tensors.
        buckets: batch sizes for CUDA graphs; larger calls run in chunks.
        padded_rows: counter of padded rows (a new one if ``None``).
        channels_last: convert the UNet's weights (in place) and inputs to
            channels_last; ``None``: on for ``inductor`` on CUDA, else off.
        cuda_graphs: wrap the compiled function in bucketed CUDA graphs;
            ``None``: for ``cudagraphs`` and for ``inductor`` on CUDA.
        inductor_mode: ``torch.compile`` mode for ``inductor``.

    Raises:
        ConfigError: unknown backend, CUDA-only backend off CUDA, torch_tensorrt missing,
            module not on the requested device / dtype.
    """
    name = check_backend(backend)
    dev, dt = check_device_dtype(unet, device, dtype)
    _check_runs_here(name, dev)
    graphs = _graphs_wanted(name, dev, cuda_graphs)
    cl = channels_last if channels_last is not None else (name == "inductor" and dev.type == "cuda")
    if cl:
        unet.to(memory_format=torch.channels_last)
    cache = Path(cache_dir) if cache_dir is not None else None
    counter = padded_rows if padded_rows is not None else PaddedRowCounter()
    example = example_unet_inputs(unet, shapes, dev, dt)
    if cl:
        example[0] = example[0].contiguous(memory_format=torch.channels_last)
    fn, art = _build(
        "unet", UNetCall(unet).eval(), example, name,
        device=dev, dtype=dt, cache_dir=cache, weights_id=weights_id, buckets=check_buckets(buckets),
        counter=counter, cuda_graphs=graphs, inductor_mode=inductor_mode, key_shapes=(shapes, cl), key_module=unet,
    )  # fmt: skip
    return CompiledUNet(
        unet, fn, backend=name, artifacts=[art], padded_rows=counter if graphs else None, channels_last=cl
    )


def compile_decoder(
    first_stage: nn.Module,
    backend: BackendName | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    latent_shape: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    weights_id: str | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    padded_rows: PaddedRowCounter | None = None,
    channels_last: bool | None = None,
    cuda_graphs: bool | None = None,
    inductor_mode: str | None = None,
) -> CompiledDecoder:
    """Compile ``first_stage.decode`` (KL or VQ) for ``backend``: ``z -> image``.

    ``latent_shape`` is the example ``[B, C, h, w]`` (default ``[1, embed_dim, 8, 8]``);
    the other arguments are those of :func:`compile_unet`. The first stage's
    weights are converted to channels_last in place when ``channels_last`` is on.
    """
    name = check_backend(backend)
    dev, dt = check_device_dtype(first_stage, device, dtype)
    _check_runs_here(name, dev)
    graphs = _graphs_wanted(name, dev, cuda_graphs)
    cl = channels_last if channels_last is not None else (name == "inductor" and dev.type == "cuda")
    if cl:
        first_stage.to(memory_format=torch.channels_last)
    shape = tuple(latent_shape) if latent_shape is not None else (1, first_stage.config.embed_dim, 8, 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev, dt)  # [B, C, h, w]
    if cl:
        z = z.contiguous(memory_format=torch.channels_last)
    counter = padded_rows if padded_rows is not None else PaddedRowCounter()
    fn, art = _build(
        "decoder", DecoderCall(first_stage).eval(), [z], name,
        device=dev, dtype=dt, cache_dir=Path(cache_dir) if cache_dir is not None else None,
        weights_id=weights_id, buckets=check_buckets(buckets), counter=counter, cuda_graphs=graphs,
        inductor_mode=inductor_mode, key_shapes=(shape, cl), key_module=first_stage,
    )  # fmt: skip
    return CompiledDecoder(fn, backend=name, dtype=dt, artifacts=[art], channels_last=cl, source=first_stage)
