"""Core-sharded execution on the CPU: batch rows run side by side, one core each.

At the sizes a CPU serves (latents of 16x16 to 64x64, a few rows), oneDNN's
intra-op threading scales poorly: two threads on one UNet call are about 1.4x one
thread, because each convolution and GEMM is too small to split well. Splitting
the *batch* instead, and running the parts at the same time on threads that each
use one core, scales almost linearly (``bench/engine_bench.py`` and
``docs/benchmarks.md`` have the figures). PyTorch releases the GIL inside every
operator, and a TorchScript graph runs entirely without it, so plain Python
threads are enough.

Two ways to split (:func:`run_split`, :class:`ShardedUNet`):

* ``per_row=True``: every row is its own call. CPU GEMM and convolution libraries
  pick kernels by batch size, so a batched call rounds a row differently from a
  one-row call; a row's numbers then depend only on the row (a one-row call on a
  one-thread core), never on its batch-mates or on which thread took it, which
  keeps the CPU's batch invariance. Without a pool the rows run one after another
  in the calling thread, with the same guarantee.
* ``per_row=False``: ``workers`` contiguous shards of near-equal size, for callers
  that batch freely (without a pool: one call), or whose model runs batch-invariant
  kernels (:mod:`ldm.kernels.batch_invariant`: a row's numbers then do not depend on
  its shard-mates, so shards keep the invariance at a fraction of the per-row cost).

The pool's threads set their intra-op thread count to 1 when they start. The
thread that drives them keeps its own setting (OpenMP keeps it per thread), except
inside :func:`coordinating`, which a sampling loop holds while it hands work to the
pool: under OpenMP's default wait policy the driving thread's OpenMP team keeps
spinning after each of its own small parallel regions and takes the cores the pool
computes on (measured: bundled model, batch 4, 4.4 -> 6.9 images/s).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

from ldm.denoiser import UNetCallable

__all__ = ["CorePool", "ShardedUNet", "coordinating", "default_core_workers", "run_split", "shared_core_pool"]

T = TypeVar("T")


def default_core_workers(device: torch.device) -> int:
    """How many one-core threads a pipeline on ``device`` uses: torch's thread count on the CPU, else 1."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _one_thread() -> None:
    torch.set_num_threads(1)


class CorePool:
    """``workers`` threads, each running its tasks with one intra-op thread and no autograd.

    Args:
        workers: number of threads (>= 2; with one, callers run inline instead).
    """

    def __init__(self, workers: int) -> None:
        if workers < 2:
            raise ValueError(f"a CorePool needs at least 2 workers, got {workers}")
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="ldm-core", initializer=_one_thread)

    def map(self, fn: Callable[[T], torch.Tensor], items: Sequence[T]) -> list[torch.Tensor]:
        """``[fn(item) for item in items]``, computed on the pool's threads, in order.

        A caller with one intra-op thread (inside :func:`coordinating`) computes the
        first item itself, on the same kernels and thread count as the pool's threads.
        """

        def task(item: T) -> torch.Tensor:
            with torch.no_grad():
                return fn(item)

        if len(items) > 1 and torch.get_num_threads() == 1:
            # a one-thread caller (see coordinating) computes the first item itself: one
            # hand-off fewer per call, and its core does not sit idle while it waits
            rest = [self._executor.submit(task, item) for item in items[1:]]
            try:
                first = task(items[0])
            finally:
                wait(rest)  # nothing of this call keeps running after it returns or raises
            return [first] + [f.result() for f in rest]
        return list(self._executor.map(task, items))

    def shards(self, n: int, *, per_row: bool) -> list[slice]:
        """Slices covering ``range(n)``: one per row, or ``min(workers, n)`` near-equal parts."""
        if per_row:
            return [slice(i, i + 1) for i in range(n)]
        parts = min(self.workers, n)
        bounds = [round(k * n / parts) for k in range(parts + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def map_batch(self, fn: Callable[[slice], torch.Tensor], n: int, *, per_row: bool) -> torch.Tensor:
        """``fn`` over the shards of a batch of ``n`` rows, concatenated back along dim 0."""
        return torch.cat(self.map(fn, self.shards(n, per_row=per_row)))

    def close(self) -> None:
        """Stop the threads (idle ones exit; running tasks finish first)."""
        self._executor.shutdown(wait=True)


_SHARED: dict[int, CorePool] = {}
_SHARED_LOCK = threading.Lock()


def shared_core_pool(workers: int) -> CorePool:
    """The process's pool of ``workers`` threads, created on first use.

    Pipelines share it, so several models in one process (benches, tests) do not
    start more one-core threads than there are cores.
    """
    with _SHARED_LOCK:
        pool = _SHARED.get(workers)
        if pool is None:
            pool = _SHARED[workers] = CorePool(workers)
        return pool


@contextmanager
def coordinating(pool: CorePool | None) -> Iterator[None]:
    """While the calling thread drives ``pool``: its own intra-op threads set to 1, then restored.

    The driving thread only does the small work between pool calls (guidance, the DDIM
    update, pixel conversion). With more than one thread of its own, every parallel
    region it runs leaves OpenMP threads spinning (``GOMP_SPINCOUNT`` under the default
    wait policy) on the cores the pool's workers need. Without a pool this does nothing.
    """
    threads = torch.get_num_threads()
    if pool is None or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_split(fn: Callable[[slice], torch.Tensor], n: int, pool: CorePool | None, *, per_row: bool) -> torch.Tensor:
    """``fn`` over the parts of a batch of ``n`` rows, concatenated along dim 0.

    With a pool the parts run on its threads (:meth:`CorePool.map_batch`); without
    one they run inline: one call per row when ``per_row``, else one call.
    """
    if pool is not None:
        return pool.map_batch(fn, n, per_row=per_row)
    if per_row:
        return torch.cat([fn(slice(i, i + 1)) for i in range(n)])
    return fn(slice(0, n))


class ShardedUNet:
    """Calls ``unet`` on parts of the batch (see :func:`run_split`).

    Args:
        unet: any UNet callable (eager module or a compiled backend).
        pool: the threads to run on; ``None`` runs the parts in the calling thread.
        per_row: one call per row (batch-invariant) instead of one per worker.
    """

    def __init__(self, unet: UNetCallable, pool: CorePool | None, *, per_row: bool) -> None:
        self.unet = unet
        self.pool = pool
        self.per_row = per_row

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def part(s: slice) -> torch.Tensor:
            return self.unet(
                x[s], timesteps[s], context=None if context is None else context[s], y=None if y is None else y[s]
            )

        return run_split(part, x.shape[0], self.pool, per_row=self.per_row)  # [M, C, h, w]
