"""Speed of the bundled model on the CPU: a batch of 8 images, 25 DDIM steps, guidance 5.

Modes (each through ``LatentDiffusionPipeline.generate``, so text encoding,
sampling with classifier-free guidance and decoding are all counted):

* ``eager-batched``: one UNet call over all 16 rows (8 images x cond/uncond) per step;
* ``eager-row-serial``: the CPU serving default (``batch_invariant=True``): the
  UNet, text encoder and decoder run one row at a time so that an image does not
  depend on its batch-mates;
* ``inductor-batched``: the UNet and decoder under ``torch.compile`` (compile time
  reported separately; the timed runs are after warm-up).

The median of ``--repeats`` timed runs after one warm-up run is reported::

    python bench/bundled_bench.py --threads 2                      # the issue's setting
    python bench/bundled_bench.py --threads 2 --markdown           # rows for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm_serve.models import bundled_model_path

PROMPTS = (
    "a big red circle on the left of a small blue square, on a white background",
    "a small yellow star at the top, on a black background",
    "a big green triangle in the centre, on a gray background",
    "a small purple square above a big orange circle, on a brown background",
)
MODES = ("eager-batched", "eager-row-serial", "inductor-batched")


def _rows(batch: int, steps: int, guidance: float) -> list[GenerationRow]:
    return [GenerationRow(PROMPTS[i % len(PROMPTS)], i, "", steps, guidance, 0.0) for i in range(batch)]


def _compile(pipe: LatentDiffusionPipeline) -> None:
    pipe.model.unet = torch.compile(pipe.model.unet, dynamic=False)  # type: ignore[assignment]
    fs = pipe.model.first_stage
    fs.decode = torch.compile(fs.decode, dynamic=False)  # type: ignore[method-assign]


def run_mode(model: Path, mode: str, batch: int, steps: int, guidance: float, repeats: int) -> dict[str, object]:
    """Time ``repeats`` generate() calls (after a warm-up call) in one mode."""
    pipe = load_pipeline(model)
    pipe.batch_invariant = mode == "eager-row-serial"
    rows = _rows(batch, steps, guidance)
    size = pipe.default_size
    compile_s = 0.0
    if mode.startswith("inductor"):
        _compile(pipe)
    start = time.perf_counter()
    pipe.generate(rows, size, size)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - start
    if mode.startswith("inductor"):
        compile_s = warmup_s
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(rows, size, size)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "mode": mode,
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
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--markdown", action="store_true", help="print table rows instead of JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path()
    if model is None:
        print("no bundled model found; pass --model", file=sys.stderr)
        return 2
    results = [run_mode(model, m, args.batch, args.steps, args.guidance, args.repeats) for m in args.modes]
    env = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.markdown:
        print(f"| mode | batch | steps | median s / batch | images/s | first call s | ({env}) |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['mode']} | {r['batch']} | {r['steps']} | {r['median_s']} | {r['images_per_s']} "
                f"| {r['first_call_s']} | |"
            )
    else:
        print(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
