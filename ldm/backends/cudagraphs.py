"""Batch-size buckets, and CUDA graphs captured per bucket.

A CUDA graph replays a fixed sequence of kernels on fixed buffers, which removes
the per-op launch and Python overhead that dominates a UNet step at small batch
(``perf-anchors.md``: ~680 kernels per step). Graphs need fixed shapes, so a
call with ``n`` rows runs on the smallest bucket ``b >= n``:

* rows ``[0, n)`` of the static inputs get the call's tensors, rows ``[n, b)``
  are zeroed (masked out: every op of the UNet and decoder is row-wise, so they
  cannot change the real rows), and only output rows ``[0, n)`` are returned;
* ``b - n`` is added to a :class:`~ldm.backends.base.PaddedRowCounter`
  (exported as ``ldm_engine_padded_rows_total``);
* a call larger than the biggest bucket runs in chunks of that bucket.

:class:`BucketedRunner` holds the bucketing logic and is device-agnostic (the
tests run it on the CPU with eager per-bucket runners); :class:`CudaGraphRunner`
is the per-bucket runner that captures and replays a graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from ldm.backends.base import PaddedRowCounter
from ldm_serve.errors import ConfigError

__all__ = ["BucketedRunner", "CudaGraphRunner", "PaddingRunner", "check_buckets"]

Fn = Callable[..., torch.Tensor]
RunnerFactory = Callable[[int, Sequence[torch.Tensor]], "PaddingRunner"]


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated bucket sizes; :class:`ConfigError` if empty or not positive."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ConfigError(f"batch buckets must be positive integers, got {list(buckets)}")
    return out


class PaddingRunner:
    """Runs ``fn`` on inputs zero-padded to ``size`` rows (eager; the CPU reference runner)."""

    def __init__(self, fn: Fn, size: int) -> None:
        self.fn = fn
        self.size = size

    def __call__(self, inputs: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
        padded = [
            t if rows == self.size else torch.cat([t, t.new_zeros((self.size - rows, *t.shape[1:]))])
            for t in inputs
        ]
        return self.fn(*padded)[:rows]


class CudaGraphRunner(PaddingRunner):
    """One captured CUDA graph of ``fn`` at ``size`` rows.

    Static input buffers are allocated like ``template`` (same trailing shape,
    dtype, device and memory format); ``warmup`` eager calls on a side stream
    precede the capture (cuBLAS/cuDNN workspaces, and compilation when ``fn`` is
    a ``torch.compile`` function). Graphs of one :class:`BucketedRunner` share a
    memory pool; that is safe because calls are serialised and every replay's
    output is copied out before the next replay.
    """

    def __init__(
        self,
        fn: Fn,
        size: int,
        template: Sequence[torch.Tensor],
        *,
        pool: object | None = None,
        warmup: int = 2,
    ) -> None:
        super().__init__(fn, size)
        self.static_in = [
            torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device).contiguous(
                memory_format=_memory_format(t)
            )
            for t in template
        ]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.static_out = fn(*self.static_in)

    def __call__(self, inputs: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
        for buf, t in zip(self.static_in, inputs, strict=True):
            buf[:rows].copy_(t)
            if rows < self.size:
                buf[rows:].zero_()
        self.graph.replay()
        return self.static_out[:rows].clone()


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class BucketedRunner:
    """Calls ``fn(*tensors)`` through per-bucket runners made on first use.

    Args:
        make_runner: ``(bucket_size, example_inputs) -> runner``; a runner is
            called as ``runner(inputs, rows)`` and returns the first ``rows`` rows.
        buckets: allowed batch sizes.
        counter: receives the number of padded rows of every call.

    Runners are keyed by bucket and by the trailing shape and dtype of each input,
    so a new image size or context length gets its own runner (capture).
    """

    def __init__(
        self,
        make_runner: RunnerFactory,
        buckets: Sequence[int],
        counter: PaddedRowCounter | None = None,
    ) -> None:
        self.make_runner = make_runner
        self.buckets = check_buckets(buckets)
        self.counter = counter if counter is not None else PaddedRowCounter()
        self._runners: dict[tuple, PaddingRunner] = {}
        self._lock = threading.Lock()

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` rows (``rows`` <= the largest bucket)."""
        return next(b for b in self.buckets if b >= rows)

    @property
    def captured(self) -> list[tuple]:
        """Keys ``(bucket, (shape, dtype) per input)`` of the runners made so far."""
        return list(self._runners)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        n = tensors[0].shape[0]
        biggest = self.buckets[-1]
        outs = []
        with self._lock:
            for start in range(0, n, biggest):
                chunk = [t[start : start + biggest] for t in tensors]
                rows = chunk[0].shape[0]
                size = self.bucket_for(rows)
                key = (size, *((tuple(t.shape[1:]), t.dtype) for t in chunk))
                runner = self._runners.get(key)
                if runner is None:
                    runner = self._runners[key] = self.make_runner(size, chunk)
                outs.append(runner(chunk, rows))
                self.counter.add(size - rows)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
