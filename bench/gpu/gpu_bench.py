"""GPU benchmark: diffusers fp16 eager vs our pipeline per execution backend, SD 1.5 shapes.

One invocation (``bench/gpu/run.sh`` on an H100 / H200) does everything inside a
deadline (default 9 minutes, well inside a 10-minute job):

1. builds random-weight models of the SD 1.5 shapes on the GPU (UNet 860M, KL VAE,
   CLIP ViT-L text tower; no download) and converts the same weights to diffusers'
   ``UNet2DConditionModel`` / ``AutoencoderKL`` with diffusers' single-file converters;
2. prepares each backend with :func:`ldm.backends.apply_backend` (compile, CUDA-graph
   capture, warm-up; the time is reported) and **checks it against eager** (one UNet
   call and one decode at the benchmark shapes; a mismatch beyond the dtype's tolerance
   is reported as MISMATCH, the backend is left out of the timings and the script
   exits 1);
3. measures, per batch size (order 1, 16, 8, 4 so the headline numbers come first):
   images/s of complete text-to-image runs (text encoding, 50 guided DDIM steps,
   decode, PIL), ms per UNet step (guided batch of ``2 x batch`` rows), decode ms, and
   MFU from 82.87 TFLOP per image (``perf-anchors.md``: 50 steps x 1.6065 TFLOP per
   guided step + 2.515 TFLOP decode + text);
4. writes a table between ``<!-- gpu-bench:start -->`` and ``<!-- gpu-bench:end -->``
   in ``--out`` (``docs/benchmarks.md``) and JSON + Markdown copies into ``--out-dir``.

Configurations that would not finish before the deadline are skipped and listed.
Text conditioning on the diffusers side comes from our CLIP tower (same weights,
inside the timed span), as in ``bench/engine_bench.py``.

``--tiny --device cpu`` runs the same code end to end on a tiny config in seconds
(``tests/unit/test_gpu_bench_script.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ldm.autoencoder import build_first_stage  # noqa: E402
from ldm.backends import apply_backend  # noqa: E402
from ldm.backends.base import UNetShapes  # noqa: E402
from ldm.backends.compile import example_unet_inputs  # noqa: E402
from ldm.config import AutoencoderConfig, CLIPTextConfig, ModelConfig, UNetConfig  # noqa: E402
from ldm.encoders import build_cond_stage_model  # noqa: E402
from ldm.loading.config_yaml import model_config_to_yaml  # noqa: E402
from ldm.loading.loader import LoadedModel, load_tokenizer_for, model_alphas_cumprod  # noqa: E402
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline  # noqa: E402
from ldm.tiny import randomize_unet_weights_, randomize_weights_  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402
from ldm_serve.errors import ConfigError  # noqa: E402

START, END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry"

SD15 = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(4, 2, 1), num_heads=8, legacy=False, use_spatial_transformer=True,
        transformer_depth=1, context_dim=768,
    ),
    first_stage=AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2),
    cond_stage=CLIPTextConfig(),
    conditioning_key="crossattn",
    linear_start=0.00085,
    linear_end=0.012,
    scale_factor=0.18215,
    latent_channels=4,
    image_size=64,
)  # fmt: skip

# FLOPs (perf-anchors.md, torch FlopCounterMode, SD 1.5 at 512x512): per guided step, decode, text per prompt
SD15_STEP_TFLOP, SD15_DECODE_TFLOP, SD15_TEXT_TFLOP = 1.6065, 2.515, 0.0133
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense fp16/bf16
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}  # max |a - b| / max |b|
PREP_BUDGET_S = {"eager": 5, "cudagraphs": 60, "torchscript": 90, "inductor": 240, "tensorrt": 300}


@dataclass
class Measurement:
    impl: str
    batch: int
    images_per_s: float
    seconds: list[float]
    unet_step_ms: float
    decode_ms: float
    mfu: float | None = None
    vs_diffusers: float | None = None
    vs_diffusers_b1: float | None = None


@dataclass
class State:
    started: float
    deadline: float
    env: dict = field(default_factory=dict)
    prepared: dict = field(default_factory=dict)  # impl -> {"seconds", "max_rel_err", "status", ...}
    rows: list[Measurement] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # backend -> PaddedRowCounter

    def left(self) -> float:
        return self.deadline - time.monotonic()


# --------------------------------------------------------------------------- models


def tiny_config() -> ModelConfig:
    from tests.checkpoints import TINY_SD1

    return TINY_SD1


def build_pipeline(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tmp: Path
) -> LatentDiffusionPipeline:
    """Our pipeline with random weights of ``cfg`` built directly on ``device``."""
    from tests.tokenizer_files import write_clip_tokenizer

    modules = {}
    with torch.device(device):
        modules["unet"] = UNetModel(cfg.unet)
        modules["first_stage"] = build_first_stage(cfg.first_stage)
        modules["cond_stage"] = build_cond_stage_model(cfg.cond_stage)
    for seed, (part, m) in enumerate(modules.items()):
        if part == "unet":  # numbers drawn on the device: an SD-size UNet fills in a moment
            randomize_unet_weights_(m, seed, device=device)
        else:
            randomize_weights_(m, torch.Generator(device=device).manual_seed(seed))
        m.to(dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer_for(cfg, write_clip_tokenizer(tmp / "tokenizer"))
    model = LoadedModel(
        config=cfg,
        unet=modules["unet"],
        first_stage=modules["first_stage"],
        cond_stage=modules["cond_stage"],
        tokenizer=tokenizer,
        alphas_cumprod=model_alphas_cumprod(cfg),
        scale_factor=cfg.scale_factor,
        source=f"random:{cfg.family}",
    )
    return LatentDiffusionPipeline(model, name=f"random-{cfg.family}", untrained=True)


def build_diffusers(ours: LatentDiffusionPipeline, size: int):
    """diffusers' StableDiffusionPipeline holding copies of our weights (no text encoder)."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu

    model = ours.model
    state = {f"model.diffusion_model.{k}": v for k, v in model.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in model.first_stage.state_dict().items()}
    original = yaml.safe_load(model_config_to_yaml(ours.config))
    ucfg = sfu.create_unet_diffusers_config_from_ldm(original, state, image_size=size)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(original, state, image_size=size)
    vcfg["scaling_factor"] = float(model.scale_factor)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
        vae = diffusers.AutoencoderKL(**vcfg)
    clone = {k: v.clone() for k, v in sfu.convert_ldm_unet_checkpoint(state, ucfg).items()}
    unet.load_state_dict(clone, strict=True, assign=True)
    clone = {k: v.clone() for k, v in sfu.convert_ldm_vae_checkpoint(state, vcfg).items()}
    vae.load_state_dict(clone, strict=True, assign=True)
    cfg = ours.config
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start, beta_end=cfg.linear_end,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean milliseconds of ``fn`` over ``iters`` calls (after one untimed call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


class Impl:
    """One thing to measure: generate(batch) -> images, plus its UNet and decoder."""

    def __init__(
        self,
        name: str,
        generate: Callable[[int, list[int]], list],
        unet_step: Callable[[int], Callable[[], object]],
        decode: Callable[[int], Callable[[], object]],
    ) -> None:
        self.name, self.generate, self.unet_step, self.decode = name, generate, unet_step, decode


def ours_impl(name: str, pipe: LatentDiffusionPipeline, size: int, steps: int, scale: float) -> Impl:
    f = pipe.downsample_factor

    def generate(batch: int, seeds: list[int]) -> list:
        rows = [GenerationRow(PROMPT, s, NEGATIVE, steps=steps, guidance_scale=scale) for s in seeds[:batch]]
        return pipe.generate(rows, size, size)

    def unet_step(batch: int) -> Callable[[], object]:
        shapes = UNetShapes(2 * batch, size // f, size // f, pipe.max_prompt_tokens)
        x, t, ctx = example_unet_inputs(pipe.model.unet, shapes, pipe.device, pipe.dtype)
        return lambda: pipe.model.unet(x, t, context=ctx)

    def decode(batch: int) -> Callable[[], object]:
        z = torch.randn(
            (batch, pipe.latent_channels, size // f, size // f), device=pipe.device, dtype=pipe.dtype
        )
        return lambda: pipe.model.first_stage.decode(z)

    return Impl(name, generate, unet_step, decode)


def diffusers_impl(ref, ours: LatentDiffusionPipeline, size: int, steps: int, scale: float) -> Impl:
    f = ours.downsample_factor

    def generate(batch: int, seeds: list[int], latents: torch.Tensor | None = None) -> list:
        context = ours.encode_text([PROMPT] * batch)  # the same text tower as ours, timed on both sides
        uncond = ours.encode_text([NEGATIVE] * batch)
        gens = [torch.Generator().manual_seed(s) for s in seeds[:batch]]
        return ref(
            prompt_embeds=context, negative_prompt_embeds=uncond, num_inference_steps=steps,
            guidance_scale=scale, eta=0.0, height=size, width=size, generator=gens, latents=latents,
            output_type="pil",
        ).images  # fmt: skip

    def unet_step(batch: int) -> Callable[[], object]:
        shapes = UNetShapes(2 * batch, size // f, size // f, ours.max_prompt_tokens)
        x, t, ctx = example_unet_inputs(ours.model.unet, shapes, ours.device, ours.dtype)
        return lambda: ref.unet(x, t, encoder_hidden_states=ctx)

    def decode(batch: int) -> Callable[[], object]:
        z = torch.randn(
            (batch, ours.latent_channels, size // f, size // f), device=ours.device, dtype=ours.dtype
        )
        return lambda: ref.vae.decode(z)

    return Impl("diffusers / eager", generate, unet_step, decode)


# --------------------------------------------------------------------------- checks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def check_against_eager(eager: LatentDiffusionPipeline, other: LatentDiffusionPipeline, size: int) -> dict:
    """Max relative error of one guided UNet call (2 rows) and one decode vs eager, at the bench size."""
    f = eager.downsample_factor
    shapes = UNetShapes(2, size // f, size // f, eager.max_prompt_tokens)
    x, t, ctx = example_unet_inputs(eager.model.unet, shapes, eager.device, eager.dtype)
    unet_err = rel_err(other.model.unet(x, t, context=ctx), eager.model.unet(x, t, context=ctx))
    z = torch.randn(
        (1, eager.latent_channels, size // f, size // f), generator=torch.Generator().manual_seed(3)
    )
    z = z.to(eager.device, eager.dtype)
    dec_err = rel_err(other.model.first_stage.decode(z), eager.model.first_stage.decode(z))
    return {"unet": unet_err, "decoder": dec_err}


def psnr(a: list, b: list) -> float:
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --------------------------------------------------------------------------- the run


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda}
        env["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        env["flash_attention_head_dim_40"] = flash_usable(device, dtype)
        try:
            q = "name,clocks.max.sm,power.limit,driver_version"
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def flash_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA's flash kernel accepts SD 1.5's self-attention shape (head_dim 40)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn((2, 8, 4096, 40), device=device, dtype=dtype)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return True
    except Exception:
        return False


def peak_tflops(env: dict, override: float | None) -> float | None:
    if override:
        return override
    name = env.get("gpu") or ""
    for key, value in PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def measure(
    impl: Impl,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    flops: float | None,
    peak: float | None,
) -> Measurement:
    seeds = [1000 + i for i in range(batch)]
    for _ in range(args.warmup):
        impl.generate(batch, seeds)
    secs = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        impl.generate(batch, seeds)
        sync(device)
        secs.append(time.perf_counter() - t0)
    with torch.no_grad():
        step_ms = timed(impl.unet_step(batch), device, args.step_iters)
        decode_ms = timed(impl.decode(batch), device, max(1, args.step_iters // 5))
    ips = batch / statistics.median(secs)
    mfu = ips * flops / peak if flops and peak else None
    return Measurement(impl.name, batch, ips, secs, step_ms, decode_ms, mfu)


def estimate_s(state: State, impl: str, batch: int, args: argparse.Namespace) -> float:
    """Seconds a measurement will take, from this implementation's slowest per-image time so far."""
    per_image = [statistics.median(m.seconds) / m.batch for m in state.rows if m.impl == impl]
    if not per_image:
        per_image = [statistics.median(m.seconds) / m.batch for m in state.rows]
    if not per_image:
        return 0.0
    return max(per_image) * batch * (args.warmup + args.repeats) * 1.2 + 2.0


def prepare(
    state: State, name: str, base: LatentDiffusionPipeline, size: int, buckets: list[int], dec_buckets: list[int],
    cache_dir: Path,
) -> LatentDiffusionPipeline | None:  # fmt: skip
    """A copy of ``base`` on backend ``name``, checked against eager; ``None`` if skipped or failed."""
    info: dict = {"status": "ok"}
    state.prepared[name] = info
    if state.left() < PREP_BUDGET_S.get(name, 60):
        info["status"] = (
            f"skipped: {state.left():.0f} s left, preparing needs up to {PREP_BUDGET_S.get(name)} s"
        )
        state.skipped.append(f"{name}: not prepared ({info['status']})")
        return None
    pipe = copy.copy(base)
    if (
        name == "inductor" and base.device.type == "cuda"
    ):  # channels_last converts weights in place: own copies
        pipe.model = dataclasses.replace(
            base.model, unet=copy.deepcopy(base.model.unet), first_stage=copy.deepcopy(base.model.first_stage)
        )
    t0 = time.monotonic()
    try:
        report = apply_backend(
            pipe,
            name,
            cache_dir=cache_dir,
            buckets=buckets,
            decoder_buckets=dec_buckets,
            warmup_sizes=[(size, size)],
        )
    except ConfigError as exc:
        info["status"] = f"unavailable: {exc}"
        state.skipped.append(f"{name}: {exc}")
        return None
    except Exception as exc:  # a compiler failure: loud, but the other backends still run
        info["status"] = f"FAILED: {type(exc).__name__}: {exc}"
        state.failures.append(f"{name}: preparation failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return None
    info["seconds"] = time.monotonic() - t0
    info["artifacts"] = [
        f"{a.part}: {a.seconds:.1f} s{' (cache)' if a.loaded_from_cache else ''}" for a in report.artifacts
    ]
    state.counters[name] = report.padded_rows
    errs = check_against_eager(base, pipe, size)
    info["max_rel_err"] = errs
    tol = TOLERANCE[base.dtype]
    if name != "eager" and max(errs.values()) > tol:
        info["status"] = "MISMATCH"
        msg = (f"{name}: output differs from eager beyond the {base.dtype} tolerance {tol:g}: "
               f"UNet {errs['unet']:.3g}, decoder {errs['decoder']:.3g}")  # fmt: skip
        print(f"\n{'!' * 80}\nMISMATCH {msg}\n{'!' * 80}\n", file=sys.stderr)
        state.failures.append(msg)
        return None
    print(f"[prepare] {name}: {info['seconds']:.1f} s, max rel err vs eager {errs}", file=sys.stderr)
    return pipe


def run(args: argparse.Namespace) -> State:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --tiny --device cpu for the CPU check)")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    state = State(started=time.monotonic(), deadline=time.monotonic() + args.deadline_s)
    state.env = environment(device, dtype)
    cfg = tiny_config() if args.tiny else SD15
    size = args.size or (64 if args.tiny else 512)
    state.env |= {"model": "tiny SD 1.x (tests/checkpoints.py)" if args.tiny else "SD 1.5 shapes, random weights",
                  "size": size, "steps": args.steps, "guidance": args.scale}  # fmt: skip
    sd15_512 = not args.tiny and size == 512
    flops = (
        (args.steps * SD15_STEP_TFLOP + SD15_DECODE_TFLOP + 2 * SD15_TEXT_TFLOP) * 1e12 if sd15_512 else None
    )
    peak = peak_tflops(state.env, args.peak_tflops)
    state.env["tflop_per_image"] = None if flops is None else round(flops / 1e12, 2)
    state.env["peak_tflops"] = peak
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        eager = build_pipeline(cfg, device, dtype, Path(tmp))
        impls: list[Impl] = []
        try:
            ref = build_diffusers(eager, size)
            impls.append(diffusers_impl(ref, eager, size, args.steps, args.scale))
        except ImportError:
            ref = None
            msg = "diffusers is not installed: no baseline (carry its wheel, see bench/gpu/run.sh)"
            print(f"WARNING: {msg}", file=sys.stderr)
            state.failures.append(msg)
        state.env["build_seconds"] = round(time.monotonic() - t0, 1)
        print(f"[build] {state.env['build_seconds']} s", file=sys.stderr)

        if ref is not None:  # the baseline does the same work: one image from the same x_T
            f = eager.downsample_factor
            x_T = torch.randn(
                (1, eager.latent_channels, size // f, size // f), generator=torch.Generator().manual_seed(5)
            )
            with torch.no_grad():
                theirs = impls[0].generate(1, [5], latents=x_T.to(device, dtype))
            ours = eager.generate(
                [GenerationRow(PROMPT, 5, NEGATIVE, steps=args.steps, guidance_scale=args.scale)], size, size
            )
            state.env["psnr_ours_vs_diffusers_db"] = round(psnr(ours, theirs), 1)

        batches = sorted(args.batches)
        order = [batches[0], *sorted(batches[1:], reverse=True)]  # 1 first, then the largest
        buckets = sorted({2 * b for b in batches} | set(batches))
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        pipes: dict[str, LatentDiffusionPipeline | None] = {}
        reference_images: dict[int, list] = {}
        # the baseline and the first three of ours at every batch first, then the rest
        groups = [["diffusers", *args.backends[:3]], args.backends[3:]]
        plan = [(batch, name) for group in groups for batch in order for name in group]
        for batch, name in plan:
            impl_name = "diffusers / eager" if name == "diffusers" else f"ours / {name}"
            if name == "diffusers":
                impl = impls[0] if impls else None
            else:
                if name not in pipes:
                    pipes[name] = (
                        eager
                        if name == "eager"
                        else prepare(state, name, eager, size, buckets, batches, cache_dir)
                    )
                impl = (
                    ours_impl(impl_name, pipes[name], size, args.steps, args.scale) if pipes[name] else None
                )
            if impl is None:
                continue
            need = estimate_s(state, impl_name, batch, args)
            if state.left() < need:
                state.skipped.append(
                    f"{impl_name} at batch {batch}: ~{need:.0f} s needed, {state.left():.0f} s left"
                )
                continue
            m = measure(impl, batch, args, device, flops, peak)
            state.rows.append(m)
            print(f"[measure] {impl_name} batch {batch}: {m.images_per_s:.3f} img/s, "
                  f"UNet step {m.unet_step_ms:.1f} ms, decode {m.decode_ms:.1f} ms", file=sys.stderr)  # fmt: skip
            if batch == 1 and name != "diffusers":  # same seeds as eager: how close are the final images
                images = impl.generate(1, [1000])
                if name == "eager":
                    reference_images[1] = images
                elif 1 in reference_images:
                    state.prepared[name]["psnr_vs_eager_db"] = round(psnr(images, reference_images[1]), 1)
            write_outputs(state, args)
    finish(state, args.tiny)
    return state


def finish(state: State, tiny: bool = False) -> None:
    by = {(m.impl, m.batch): m for m in state.rows}
    base1 = by.get(("diffusers / eager", 1))
    for m in state.rows:
        base = by.get(("diffusers / eager", m.batch))
        m.vs_diffusers = m.images_per_s / base.images_per_s if base else None
        m.vs_diffusers_b1 = m.images_per_s / base1.images_per_s if base1 else None
    ours = [m for m in state.rows if m.impl.startswith("ours")]
    where = " (tiny CPU check, not the goal's setting)" if tiny else ""
    b1 = [m for m in ours if m.batch == 1 and m.vs_diffusers]
    if b1:
        best = max(b1, key=lambda m: m.images_per_s)
        verdict = "met" if best.vs_diffusers >= 2.0 else "NOT met"
        state.notes.append(
            f"goal >= 2.0x diffusers eager at batch 1: {best.vs_diffusers:.2f}x ({best.impl}) - {verdict}{where}"
        )
    if ours:
        best = max(ours, key=lambda m: m.images_per_s)
        verdict = "met" if best.images_per_s >= 4.2 else "NOT met"
        gpu = state.env.get("gpu", state.env["device"])
        state.notes.append(
            f"goal >= 4.2 images/s at the best batch (H100): {best.images_per_s:.2f} images/s "
            f"({best.impl}, batch {best.batch}) on {gpu} - {verdict}{where}"
        )


def table(state: State, args: argparse.Namespace) -> str:
    env = state.env
    lines = [
        f"Generated by `bench/gpu/run.sh` ({'--tiny ' if args.tiny else ''}`gpu_bench.py`) on {env['date']}: "
        f"{env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env.get('diffusers')}, {env['dtype']}, "
        f"{env['model']}, {env['size']}x{env['size']}, {env['steps']} DDIM steps, guidance {env['guidance']}.",
        "",
        "| implementation | batch | images/s | vs diffusers (same batch) | vs diffusers batch 1 | ms / UNet step "
        "| decode ms | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(["diffusers / eager", *[f"ours / {b}" for b in args.backends]])}
    for m in sorted(state.rows, key=lambda m: (m.batch, order.get(m.impl, 99))):

        def x(v: float | None) -> str:
            return "" if v is None else f"{v:.2f}x"

        mfu = "" if m.mfu is None else f"{100 * m.mfu:.1f}%"
        lines.append(
            f"| {m.impl} | {m.batch} | {m.images_per_s:.3f} | {x(m.vs_diffusers)} | {x(m.vs_diffusers_b1)} "
            f"| {m.unet_step_ms:.2f} | {m.decode_ms:.1f} | {mfu} |"
        )
    lines += ["", "| backend | status | prepare s | max rel err vs eager (UNet / decoder) | final image PSNR vs eager |",
              "|---|---|---:|---|---:|"]  # fmt: skip
    for name, info in state.prepared.items():
        err = info.get("max_rel_err")
        errs = "" if not err else f"{err['unet']:.2e} / {err['decoder']:.2e}"
        seconds = f"{info['seconds']:.1f}" if "seconds" in info else ""
        status = str(info.get("status", "")).replace("|", "/")
        lines.append(f"| {name} | {status} | {seconds} | {errs} | {info.get('psnr_vs_eager_db', '')} |")
    lines.append("")
    facts = [
        f"build {env.get('build_seconds')} s; run {time.monotonic() - state.started:.0f} s of a "
        f"{args.deadline_s:.0f} s deadline; median of {args.repeats} runs after {args.warmup} warm-up",
        f"MFU from {env.get('tflop_per_image')} TFLOP per image and a {env.get('peak_tflops')} TFLOP/s peak"
        if env.get("tflop_per_image")
        else "MFU: only for SD 1.5 shapes at 512x512",
    ]
    if "psnr_ours_vs_diffusers_db" in env:
        facts.append(
            f"one image from the same x_T, ours (eager) vs diffusers: PSNR {env['psnr_ours_vs_diffusers_db']} dB"
        )
    if "flash_attention_head_dim_40" in env:
        facts.append(f"SDPA flash attention usable at head_dim 40: {env['flash_attention_head_dim_40']}")
    if env.get("nvidia_smi"):
        facts.append(f"nvidia-smi: {env['nvidia_smi']}")
    lines += [f"- {f}" for f in facts]
    lines += [f"- goal: {n.removeprefix('goal ')}" for n in state.notes]
    lines += [f"- skipped: {s}" for s in state.skipped]
    lines += [f"- **FAILURE**: {s}" for s in state.failures]
    return "\n".join(lines)


def write_between_markers(path: Path, body: str) -> None:
    """Replace the text between the gpu-bench markers in ``path`` (append a section if absent)."""
    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## GPU benchmark\n\n" + block + "\n"
    path.write_text(text)


def write_outputs(state: State, args: argparse.Namespace) -> None:
    body = table(state, args)
    if args.out:
        write_between_markers(Path(args.out), body)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.md").write_text(body + "\n")
        data = {"env": state.env, "prepared": state.prepared, "rows": [asdict(m) for m in state.rows],
                "padded_rows": {k: c.value for k, c in state.counters.items()},
                "skipped": state.skipped, "failures": state.failures, "notes": state.notes}  # fmt: skip
        (out / "gpu_bench.json").write_text(json.dumps(data, indent=2, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny SD 1.x config, 64x64 (CPU check of the script)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--size", type=int, default=None, help="image side (default 512; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 2 with --tiny)")
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 8 16; 1 2 with --tiny")
    p.add_argument("--backends", nargs="+", default=None,
                   help="ours, in priority order (default CUDA: eager cudagraphs inductor tensorrt torchscript; "
                        "CPU: eager torchscript)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step-iters", type=int, default=10, help="UNet calls timed for ms per step")
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip what would end after this (9 min)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense fp16 peak (default: from the GPU name)"
    )
    p.add_argument("--cache-dir", default=None, help="backend artifact cache (default: a temp dir)")
    p.add_argument("--out", default=None, help="Markdown file to update between the gpu-bench markers")
    p.add_argument(
        "--apply",
        default=None,
        help="only copy a gpu_bench.md from a GPU run between the markers of --out (default: the docs)",
    )
    p.add_argument(
        "--out-dir", default=os.environ.get("OUT"), help="folder for gpu_bench.md / .json (default $OUT)"
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (2 if args.tiny else 50)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 4, 8, 16])
    args.backends = args.backends or (
        ["eager", "cudagraphs", "inductor", "tensorrt", "torchscript"] if cuda else ["eager", "torchscript"]
    )
    if "eager" not in args.backends:
        args.backends.insert(0, "eager")  # the reference of every check
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.apply:  # bring a table that came back from the GPU machine into the docs
        doc = Path(args.out) if args.out else ROOT / "docs" / "benchmarks.md"
        write_between_markers(doc, Path(args.apply).read_text().strip())
        return 0
    state = run(args)
    write_outputs(state, args)
    print(table(state, args))
    if state.failures:
        print(f"\n{len(state.failures)} FAILURE(S):\n" + "\n".join(state.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
