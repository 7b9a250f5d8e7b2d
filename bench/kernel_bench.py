"""Batch-invariant kernel formulations vs one-row calls, on one core (the core workers' setting).

For every convolution and linear shape the model's UNet, text encoder and decoder
use (recorded from a real generation, :mod:`ldm.kernels.probe`), and for the whole
UNet (TorchScript, as served), microseconds per row of:

* ``rows``: one call per row with the default kernels (the previous batch-invariant engine);
* ``hybrid``: one call for the batch with :mod:`ldm.kernels.batch_invariant` (the default:
  oneDNN called directly for spatial convolutions, ATen's per-image im2col + GEMM for 1x1;
  oneDNN's matmul for linears over token sequences, fused q/k/v and GEGLU, per-row ``bmm``
  for one-token rows);
* ``im2col``: the same with every convolution as per-image im2col + GEMM;
* per layer, ``im2col`` and ``oneDNN`` (``torch.mkldnn_convolution``) separately, and for
  linears the per-row ``bmm`` and oneDNN's matmul;
* ``batched``: one call for the batch with the default kernels (fastest, NOT batch-invariant);
* for convolutions also ``unfold+bmm`` (``F.unfold`` then ``bmm``, invariant by construction).

First, the fixed cost per call of each kernel on a near-empty problem (what a one-row
UNet call pays about 20 + 56 times on top of its arithmetic); with the UNet table, its
GFLOP per row (``torch.utils.flop_counter``) as GFLOP/s of the invariant UNet.

Candidates run interleaved (the fixed-cost table: each kernel on its own, call after
call), the minimum of ``--repeats`` rounds is reported (the machine is shared; the
minimum is the least disturbed run).

    python bench/kernel_bench.py                       # tiny and bundled models, 8 rows
    python bench/kernel_bench.py --rows 2 --layers 0   # whole-UNet rows only
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.kernels import (  # noqa: E402
    InvariantConv2d,
    InvariantLinear,
    im2col_conv2d,
    make_batch_invariant,
    onednn_conv2d,
    onednn_linear,
    per_row_linear,
    takes_onednn_linear,
)
from ldm.kernels.probe import record_layer_calls, row_batch  # noqa: E402
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline  # noqa: E402
from ldm_serve.cpu_allocator import allocator_in_use  # noqa: E402


def best_us(fns: dict[str, Callable[[], object]], repeats: int, rows: int) -> dict[str, float]:
    """Minimum microseconds per row of each callable, run round-robin."""
    best = dict.fromkeys(fns, float("inf"))
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return {k: v * 1e6 / rows for k, v in best.items()}


def conv_candidates(m: nn.Conv2d, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    n, k = x.shape[0], m.kernel_size
    w, b, s, p = m.weight.contiguous(), m.bias, list(m.stride), list(m.padding)

    def unfold_bmm() -> torch.Tensor:
        cols = F.unfold(x, k, padding=p, stride=s)  # [N, C_in*kh*kw, L]
        out = torch.bmm(w.reshape(w.shape[0], -1).expand(n, -1, -1), cols)  # [N, C_out, L]
        return out if b is None else out + b[:, None]

    return {
        "rows": lambda: [F.conv2d(x[i : i + 1], w, b, s, p) for i in range(n)],
        "im2col": lambda: im2col_conv2d(x, w, b, s, p),
        "oneDNN": lambda: onednn_conv2d(x, w, b, s, p),
        "batched": lambda: F.conv2d(x, w, b, s, p),
        "unfold+bmm": unfold_bmm,
    }


def linear_candidates(m: nn.Linear, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    cands = {
        "rows": lambda: [F.linear(x[i : i + 1], m.weight, m.bias) for i in range(x.shape[0])],
        "im2col": lambda: per_row_linear(x, m.weight, m.bias),
        "batched": lambda: F.linear(x, m.weight, m.bias),
    }
    if takes_onednn_linear(x):  # oneDNN's matmul is invariant only for rows of several tokens
        cands["oneDNN"] = lambda: onednn_linear(x, m.weight, m.bias)
    return cands


def layer_table(pipe: LatentDiffusionPipeline, rows: int, repeats: int, limit: int) -> list[str]:
    parts = [pipe.model.unet, pipe.model.first_stage, pipe.model.cond_stage]
    row = GenerationRow("a red circle", seed=0, negative_prompt="blue", steps=1, guidance_scale=5.0)
    calls = record_layer_calls(parts, lambda: pipe.generate([row], pipe.default_size, pipe.default_size),
                               (InvariantConv2d, InvariantLinear))  # fmt: skip
    lines = []
    gen = torch.Generator().manual_seed(0)
    for call in calls[: limit or None]:
        (x,) = row_batch(call.args, rows, gen)
        cands = (conv_candidates if isinstance(call.module, nn.Conv2d) else linear_candidates)(call.module, x)
        us = best_us(cands, repeats, rows)
        shape = "x".join(str(d) for d in call.args[0].shape[1:])
        layer = repr(call.module).split("(", 1)[1].rstrip(")")[:48]
        cells = " | ".join(
            f"{us[k]:.0f}" if k in us else "-" for k in ("rows", "im2col", "oneDNN", "batched", "unfold+bmm")
        )
        lines.append(
            f"| {call.name.split('.')[0]} {type(call.module).__bases__[0].__name__}({layer}) "
            f"| {shape} | {cells} |"
        )
    return lines


def unet_candidates(traced: dict, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> dict[str, Callable]:
    n = x.shape[0]
    return {
        "rows": lambda: [traced["plain"](x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(n)],
        "hybrid": lambda: traced["hybrid"](x, t, c),
        "im2col": lambda: traced["im2col"](x, t, c),
        "batched": lambda: traced["plain"](x, t, c),
    }


def top_ops(fn: Callable[[], object], rounds: int, top: int) -> list[tuple[str, float, int]]:
    """``(op, share of self CPU time, calls per round)`` of the ``top`` ops of ``fn`` (torch.profiler)."""
    from torch.profiler import profile

    with torch.inference_mode():
        fn()
        with profile() as prof:
            for _ in range(rounds):
                fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / total, e.count // rounds) for e in events[:top]]


def call_overhead_lines(repeats: int) -> list[str]:
    """Microseconds per call of each kernel on a near-empty problem: its fixed cost per call.

    A UNet call at one row makes about 20 oneDNN convolutions and 56 oneDNN matmuls on small
    tensors, so these fixed costs, not arithmetic, decide the one-row figures.
    """
    x, w, b = torch.randn(1, 4, 4, 4), torch.randn(8, 4, 3, 3), torch.randn(8)  # conv 4 -> 8, 4x4 map
    xl, wl, bl = torch.randn(1, 4, 8), torch.randn(8, 8), torch.randn(8)  # 4 tokens, 8 -> 8
    fns: dict[str, Callable[[], object]] = {
        "conv: oneDNN (`onednn_conv2d`)": lambda: onednn_conv2d(x, w, b, [1, 1], [1, 1]),
        "conv: ATen im2col + GEMM (`im2col_conv2d`)": lambda: im2col_conv2d(x, w, b, [1, 1], [1, 1]),
        "conv: `F.conv2d` (picks per call)": lambda: F.conv2d(x, w, b, 1, 1),
        "linear: oneDNN matmul (`onednn_linear`)": lambda: onednn_linear(xl, wl, bl),
        "linear: per-row `bmm` (`per_row_linear`)": lambda: per_row_linear(xl, wl, bl),
        "linear: `F.linear` (MKL)": lambda: F.linear(xl, wl, bl),
        "element-wise add (dispatch floor)": lambda: xl + xl,
    }
    # each kernel on its own, call after call (interleaving them would measure cold caches)
    return [f"| {k} | {best_us({k: fn}, 200 * repeats, 1)[k]:.1f} |" for k, fn in fns.items()]


def unet_gflop_per_row(unet: nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """GFLOP of one UNet row (``torch.utils.flop_counter``: convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*example)
    return counter.get_total_flops() / 1e9


def unet_table(path: Path, rows_list: list[int], repeats: int, profile_rows: int = 0) -> list[str]:
    """Whole UNet, TorchScript: per-row calls of the plain UNet vs one call of the invariant ones."""
    plain = load_pipeline(path, core_workers=1)
    h = plain.default_size // plain.downsample_factor
    ctx_len, ctx_dim = plain.max_prompt_tokens, plain.config.unet.context_dim
    example = (
        torch.randn(1, plain.latent_channels, h, h),
        torch.tensor([10]),
        torch.randn(1, ctx_len, ctx_dim),
    )

    def traced(unet: nn.Module) -> torch.jit.ScriptModule:
        return torch.jit.freeze(torch.jit.trace(unet.eval(), example, check_trace=False))

    with torch.no_grad():
        fns = {
            "plain": traced(plain.model.unet),
            "hybrid": traced(make_batch_invariant(copy.deepcopy(plain.model.unet), conv="hybrid")),
            "im2col": traced(make_batch_invariant(copy.deepcopy(plain.model.unet), conv="im2col")),
        }
    gflop = unet_gflop_per_row(plain.model.unet, example)
    lines = []
    for n in rows_list:
        x = torch.randn(n, plain.latent_channels, h, h)
        t, c = torch.randint(0, 1000, (n,)), torch.randn(n, ctx_len, ctx_dim)
        ms = {k: v / 1000 for k, v in best_us(unet_candidates(fns, x, t, c), repeats, n).items()}
        lines.append(f"| {n} | {ms['rows']:.2f} | {ms['hybrid']:.2f} ({ms['rows'] / ms['hybrid']:.2f}x) | "
                     f"{ms['im2col']:.2f} ({ms['rows'] / ms['im2col']:.2f}x) "
                     f"| {ms['batched']:.2f} | {gflop * 1000 / ms['hybrid']:.0f} |")  # fmt: skip
    if profile_rows:
        x = torch.randn(profile_rows, plain.latent_channels, h, h)
        t, c = torch.randint(0, 1000, (profile_rows,)), torch.randn(profile_rows, ctx_len, ctx_dim)
        for name, fn in unet_candidates(fns, x, t, c).items():
            ops = top_ops(fn, 3, 6)
            lines.append(f"\nTop ops, {name}, {profile_rows} rows "
                         "(share of self CPU time, calls per forward): "
                         + ", ".join(f"`{k}` {share:.0%} ({n})" for k, share, n in ops))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: tiny random + bundled)"
    )
    parser.add_argument("--rows", type=int, default=8, help="rows per call for the layer table")
    parser.add_argument("--unet-rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=-1, help="layer shapes per model (-1: all, 0: none)")
    parser.add_argument(
        "--profile-rows", type=int, default=8, help="torch.profiler top ops at this many rows (0: off)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a core worker's setting
    print(f"\n### Fixed cost per call, one thread (us; allocator: {allocator_in_use()})\n")
    print("| kernel | us per call |\n|---|---:|")
    print("\n".join(call_overhead_lines(max(3, args.repeats // 4))))

    from ldm.random_model import write_random_model
    from ldm_serve.models import bundled_model_path

    with tempfile.TemporaryDirectory() as tmp:
        models = (
            [args.model] if args.model else [write_random_model(Path(tmp) / "tiny"), bundled_model_path()]
        )
        for path in [m for m in models if m is not None]:
            label = Path(path).stem
            print(f"\n### {label}: whole UNet, TorchScript, one thread (ms per row)\n")
            print("| rows per call | one call per row (previous) | invariant hybrid, one call (speed-up) | "
                  "invariant im2col, one call (speed-up) | "
                  "default kernels, one call (not invariant) | invariant hybrid: GFLOP/s |")  # fmt: skip
            print("|---:|---:|---:|---:|---:|---:|")
            print(
                "\n".join(
                    unet_table(Path(path), args.unet_rows, max(3, args.repeats // 2), args.profile_rows)
                )
            )
            if args.layers:
                pipe = load_pipeline(path, core_workers=2)
                print(f"\n### {label}: layers, {args.rows} rows, one thread (us per row)\n")
                print(
                    "| layer | input (one row) | rows | invariant: im2col (linear: per-row bmm) "
                    "| invariant: oneDNN direct (linear: oneDNN matmul) "
                    "| batched (not invariant) | unfold+bmm |"
                )
                print("|---|---|---:|---:|---:|---:|---:|")
                print("\n".join(layer_table(pipe, args.rows, args.repeats, max(0, args.layers))))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
