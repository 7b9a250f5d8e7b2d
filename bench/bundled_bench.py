"""Speed of the bundled model on the CPU: a batch of 8 images, 25 DDIM steps, guidance 5.

Modes (each through ``LatentDiffusionPipeline.generate``, so text encoding,
sampling with classifier-free guidance and decoding are all counted):

* ``eager-batched``: one UNet call over all 16 rows (8 images x cond/uncond) per
  step, with all of torch's threads (``core_workers=1``);
* ``eager-row-serial``: ``batch_invariant=True`` with ``core_workers=1``: the UNet,
  text encoder and decoder run one row at a time so that an image does not depend
  on its batch-mates;
* ``eager-row-parallel``: the CPU serving default: batch-invariant rows run side by
  side on one-core threads (``core_workers`` = torch's threads, :mod:`ldm.execution.core_pool`);
* ``eager-sharded``: not batch-invariant; the batch split into one shard per core;
* ``torchscript-row-parallel`` / ``torchscript-sharded``: the same on the
  ``torchscript`` backend (``LDM_BACKEND=torchscript``);
* ``inductor-batched``: the UNet and decoder under ``torch.compile`` (compile time
  reported separately; the timed runs are after warm-up).

The median of ``--repeats`` timed runs after one warm-up run is reported::

    python bench/bundled_bench.py --threads 2                      # the issue's setting
    python bench/bundled_bench.py --threads 2 --markdown           # rows for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm.backends import apply_backend
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm_serve.cpu_threads import reexec_with_wait_policy
from ldm_serve.models import bundled_model_path

PROMPTS = (
    "a big red circle on the left of a small blue square, on a white background",
    "a small yellow star at the top, on a black background",
    "a big green triangle in the centre, on a gray background",
    "a small purple square above a big orange circle, on a brown background",
)
# mode -> (backend, batch_invariant, pooled: core_workers = torch's threads instead of 1)
MODES: dict[str, tuple[str, bool, bool]] = {
    "eager-batched": ("eager", False, False),
    "eager-row-serial": ("eager", True, False),
    "eager-row-parallel": ("eager", True, True),
    "eager-sharded": ("eager", False, True),
    "torchscript-row-parallel": ("torchscript", True, True),
    "torchscript-sharded": ("torchscript", False, True),
    "inductor-batched": ("inductor", False, False),
}


def _rows(batch: int, steps: int, guidance: float) -> list[GenerationRow]:
    return [GenerationRow(PROMPTS[i % len(PROMPTS)], i, "", steps, guidance, 0.0) for i in range(batch)]


def _compile(pipe: LatentDiffusionPipeline) -> None:
    pipe.model.unet = torch.compile(pipe.model.unet, dynamic=False)  # type: ignore[assignment]
    fs = pipe.model.first_stage
    fs.decode = torch.compile(fs.decode, dynamic=False)  # type: ignore[method-assign]


def run_mode(model: Path, mode: str, batch: int, steps: int, guidance: float, repeats: int) -> dict[str, object]:
    """Time ``repeats`` generate() calls (after a warm-up call) in one mode."""
    backend, invariant, pooled = MODES[mode]
    workers = torch.get_num_threads() if pooled else 1
    pipe = load_pipeline(model, batch_invariant=invariant, core_workers=workers)
    rows = _rows(batch, steps, guidance)
    size = pipe.default_size
    compile_s = 0.0
    if backend == "inductor":
        _compile(pipe)
    elif backend == "torchscript":
        with tempfile.TemporaryDirectory() as cache:
            compile_s = apply_backend(pipe, backend, cache_dir=Path(cache)).seconds
    start = time.perf_counter()
    pipe.generate(rows, size, size)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - start
    if backend == "inductor":
        compile_s = warmup_s
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(rows, size, size)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "mode": mode,
        "core_workers": workers,
        "batch": batch,
        "steps": steps,
        "guidance": guidance,
        "median_s": round(median, 3),
        "min_s": round(min(times), 3),
        "images_per_s": round(batch / median, 3),
        "first_call_s": round(warmup_s, 2),
        "compile_s": round(compile_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--markdown", action="store_true", help="print table rows instead of JSON")
    p.add_argument("--omp-passive", action="store_true",
                   help="run under OMP_WAIT_POLICY=PASSIVE, as a CPU worker with core workers does (restarts itself)")  # fmt: skip
    args = p.parse_args(argv)
    if args.omp_passive:
        reexec_with_wait_policy("PASSIVE")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path()
    if model is None:
        print("no bundled model found; pass --model", file=sys.stderr)
        return 2
    results = [run_mode(model, m, args.batch, args.steps, args.guidance, args.repeats) for m in args.modes]
    env = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'default')}"
    )
    if args.markdown:
        print(f"| mode | core workers | batch | steps | median s / batch | images/s | compile s | ({env}) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['mode']} | {r['core_workers']} | {r['batch']} | {r['steps']} | {r['median_s']} "
                f"| {r['images_per_s']} | {r['compile_s']} | |"
            )
    else:
        print(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
