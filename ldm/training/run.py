"""All training stages end to end, with logging, resumable checkpoints and the final export.

Layout of the output folder::

    DIR/train_state/autoencoder.pt   autoencoder weights + optimizer + step (+ elapsed seconds)
    DIR/train_state/diffusion.pt     UNet, text encoder, optimizer, EMA, scale factor, step
    DIR/train_state/binding-K.pt     the same for round K of stage 2b (more diffusion on two-object scenes)
    DIR/train_state/decoder.pt       decoder fine-tune weights + optimizer + step
    DIR/tokenizer/vocab.txt          written first; the trainer tokenizes through it
    DIR/<name>.safetensors|.yaml|.json, DIR/MODEL_CARD.md   the export (at the end)

State files are written every ``checkpoint_every`` steps and at the end of a
stage (to a temporary name, then renamed), and read back with
``torch.load(weights_only=True)``. With ``resume`` a run continues from them;
because every step's data and noise depend only on ``(seed, step)``, the
continued run computes exactly the steps an uninterrupted run would have.
Once a diffusion state exists the autoencoder is final (its steps are not extended).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ldm.autoencoder import AutoencoderKL
from ldm.data.judge import DEFAULT_WEIGHTS, accuracy_report, judge_scenes
from ldm.data.shapes import parse_caption, write_vocab
from ldm.loading.checkpoint import read_state_dict
from ldm.tokenizers import BertTokenizer
from ldm.training.autoencoder import AutoencoderTrainer, DecoderFinetuner, psnr, reconstruct
from ldm.training.data import scene_batch
from ldm.training.diffusion import LatentDiffusionTrainer
from ldm.training.export import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    ExportedModel,
    export_model,
)
from ldm.training.presets import PRESETS, Preset

__all__ = ["RunOptions", "run_training"]

HELD_OUT_OFFSET = 1_000_003  # held-out scenes: stream data_seed + this
BINDING_SEED_OFFSET = 100  # noise of stage 2b's round k (from 0): seed + this + k (stage 2 uses seed)
BINDING_DATA_OFFSET = 893  # scenes of round k: stream data_seed + this + k (900, 901, ... for the default 7)


@dataclass(frozen=True)
class RunOptions:
    """What :func:`run_training` does; ``None`` fields take the preset's value."""

    out: Path
    preset: str = "bundled"
    ae_steps: int | None = None
    ldm_steps: int | None = None
    binding_steps: tuple[int, ...] | None = None  # steps of each stage-2b round; (0,) = skip stage 2b
    batch_size: int | None = None  # diffusion batch
    ae_batch_size: int | None = None
    ae_crop: int | None = None  # 0 = full images
    ae_lr: float | None = None
    ldm_lr: float | None = None
    threads: int | None = None
    seed: int = 0
    data_seed: int = 7
    resume: bool = False
    checkpoint_every: int = 250
    log_every: int = 25
    name: str = "shapes-ldm-f4"
    stem: str | None = None  # file stem of the export; None = name
    fp16: bool = True
    device: str = "cpu"
    command: str = ""
    start_from: Path | None = None  # a released checkpoint: run only stage 2b from its weights


def _resolve(options: RunOptions) -> Preset:
    if options.preset not in PRESETS:
        raise ValueError(f"unknown preset {options.preset!r}; expected one of {', '.join(PRESETS)}")
    p = PRESETS[options.preset]
    ae = dataclasses.replace(
        p.autoencoder,
        steps=options.ae_steps if options.ae_steps is not None else p.autoencoder.steps,
        batch_size=options.ae_batch_size or p.autoencoder.batch_size,
        crop=p.autoencoder.crop if options.ae_crop is None else (options.ae_crop or None),
        lr=options.ae_lr or p.autoencoder.lr,
    )
    ldm = dataclasses.replace(
        p.diffusion,
        steps=options.ldm_steps if options.ldm_steps is not None else p.diffusion.steps,
        batch_size=options.batch_size or p.diffusion.batch_size,
        lr=options.ldm_lr or p.diffusion.lr,
    )
    binding = p.binding
    if options.binding_steps is not None:
        if tuple(options.binding_steps) == (0,):
            binding = ()
        elif len(options.binding_steps) != len(binding):
            raise ValueError(
                f"binding_steps: preset {options.preset!r} has {len(binding)} stage-2b round(s); give one step"
                f" count per round or 0 to skip the stage, got {list(options.binding_steps)}"
            )
        else:
            binding = tuple(
                dataclasses.replace(cfg, steps=n) for cfg, n in zip(binding, options.binding_steps, strict=True)
            )
    return dataclasses.replace(p, autoencoder=ae, diffusion=ldm, binding=binding)


def _save(state: dict[str, object], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, object]:
    return torch.load(path, map_location="cpu", weights_only=True)


class _Meter:
    """Steps per second over the last logging window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        value = self.steps / elapsed if elapsed > 0 else 0.0
        self.t0, self.steps = time.perf_counter(), 0
        return value


def _log_line(stage: str, step: int, total: int, parts: dict[str, float], its: float) -> str:
    fields = " ".join(f"{k} {v:.4g}" for k, v in parts.items())
    eta = (total - step) / its if its > 0 else float("inf")
    return f"[{stage}] step {step}/{total} {fields} | {its:.3f} it/s ({1 / its if its else 0:.2f} s/step) eta {eta / 60:.1f} min"


class _Trainer(Protocol):
    """What every stage's trainer offers the loop below."""

    step: int

    def next_step(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, object]: ...
    def load_state_dict(self, state: dict[str, object]) -> None: ...


def _resume(trainer: _Trainer, path: Path, tag: str, options: RunOptions, emit: Callable[[str], None]) -> float:
    """Load ``path`` into ``trainer`` when resuming; returns the seconds the stage had already run."""
    if not (options.resume and path.exists()):
        return 0.0
    saved = _load(path)
    trainer.load_state_dict(saved["trainer"])  # type: ignore[arg-type]
    emit(f"[{tag}] resumed at step {trainer.step}")
    return float(saved["elapsed_s"])  # type: ignore[arg-type]


def _train(
    trainer: _Trainer,
    tag: str,
    total: int,
    path: Path,
    elapsed: float,
    options: RunOptions,
    emit: Callable[[str], None],
    after_step: Callable[[], None] | None = None,
) -> float:
    """Step ``trainer`` up to ``total``, logging and saving its state; returns the stage's seconds so far."""
    meter, start = _Meter(), time.perf_counter()
    while trainer.step < total:
        parts = trainer.next_step()
        meter.tick()
        if after_step is not None:
            after_step()
        if trainer.step % options.log_every == 0 or trainer.step == total:
            emit(_log_line(tag, trainer.step, total, parts, meter.rate()))
        if trainer.step % options.checkpoint_every == 0 or trainer.step == total:
            _save({"trainer": trainer.state_dict(), "elapsed_s": elapsed + time.perf_counter() - start}, path)
    return elapsed + time.perf_counter() - start


def _judge_reconstructions(ae: AutoencoderKL, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """What the judge reads in ``ae``'s reconstructions of held-out scenes ({} without judge weights).

    The diffusion model cannot draw better than its decoder, so this bounds its scores.
    """
    if not DEFAULT_WEIGHTS.is_file():
        return {}
    report = accuracy_report([parse_caption(c) for c in captions], judge_scenes(reconstruct(ae, images).cpu()))
    return {k: round(report[k], 3) for k in ("background", "shape", "colour", "objects")}


def _prepare_output(options: RunOptions, preset: Preset) -> tuple[Path, BertTokenizer]:
    """Create ``DIR/train_state`` (refusing old state unless resuming) and ``DIR/tokenizer``; returns both.

    Raises:
        FileExistsError: training state exists and ``resume`` is off.
    """
    out = Path(options.out)
    state_dir = out / "train_state"
    if not options.resume and any(state_dir.glob("*.pt")):
        raise FileExistsError(f"{state_dir} holds training state; pass resume=True (--resume) or use a new folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    cond = preset.model.cond_stage
    assert cond is not None and hasattr(cond, "max_seq_len")
    return state_dir, BertTokenizer.from_dir(write_vocab(out / "tokenizer").parent, max_length=cond.max_seq_len)


StartWeights = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]
"""UNet weights, text-encoder weights and scale factor a first binding round can start from."""


def _binding_rounds(
    preset: Preset,
    options: RunOptions,
    autoencoder: AutoencoderKL,
    tokenizer: BertTokenizer,
    start: LatentDiffusionTrainer | StartWeights,
    emit: Callable[[str], None],
) -> tuple[LatentDiffusionTrainer | None, list[dict[str, object]], float]:
    """Stage 2b: each round continues from the previous one's EMA weights (the first from ``start``).

    Returns the last round's trainer (``None`` when no round ran), a record of every
    round for the metadata, and the stage's seconds.
    """
    state_dir = Path(options.out) / "train_state"
    previous: LatentDiffusionTrainer | None = start if isinstance(start, LatentDiffusionTrainer) else None
    rounds: list[dict[str, object]] = []
    seconds = 0.0
    for k, cfg in enumerate(cfg for cfg in preset.binding if cfg.steps > 0):
        tag = f"binding-{k + 1}"
        bind = LatentDiffusionTrainer(
            preset.model,
            cfg,
            autoencoder,
            tokenizer,
            seed=options.seed + BINDING_SEED_OFFSET + k,
            data_seed=options.data_seed + BINDING_DATA_OFFSET + k,
            device=options.device,
        )
        if previous is not None:
            bind.start_from(previous)
        else:
            assert not isinstance(start, LatentDiffusionTrainer)
            bind.start_from_weights(*start)
        path = state_dir / f"{tag}.pt"
        elapsed = _resume(bind, path, tag, options, emit)
        seconds += _train(bind, tag, cfg.steps, path, elapsed, options, emit)
        rounds.append(
            {
                "steps": bind.step,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "two_object_prob": cfg.two_object_prob,
                "ema_decay": cfg.ema_decay,
                "seed": bind.seed,
                "data_seed": bind.data_seed,
            }
        )
        previous = bind
    last = previous if rounds else None
    return last, rounds, seconds


def _continue_release(options: RunOptions, preset: Preset, emit: Callable[[str], None]) -> ExportedModel:
    """Run only stage 2b from a released checkpoint of this preset (``options.start_from``), then export.

    The checkpoint's autoencoder (with its fine-tuned decoder) and scale factor are
    kept; its ``<stem>.json`` metadata, when present, is carried over with the new
    rounds appended, so the export still describes stages 1-3.
    """
    source = Path(options.start_from)  # type: ignore[arg-type]
    sd = read_state_dict(source)
    out = Path(options.out)
    _, tokenizer = _prepare_output(options, preset)
    model = preset.model

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v.float() for k, v in sd.items() if k.startswith(prefix)}

    autoencoder = AutoencoderKL(model.first_stage)
    autoencoder.load_state_dict(part(FIRST_STAGE_PREFIX))
    autoencoder.to(options.device).eval()
    if "scale_factor" not in sd:
        raise ValueError(f"{source} has no scale_factor buffer; stage 2b needs the model's latent scale")
    start: StartWeights = (part(UNET_PREFIX), part(COND_STAGE_PREFIX), float(sd["scale_factor"]))
    emit(f"[binding] starting from {source} (scale_factor {start[2]:.6g})")
    final, rounds, seconds = _binding_rounds(preset, options, autoencoder, tokenizer, start, emit)
    if final is None:
        raise ValueError("start_from needs at least one stage-2b round with steps > 0")

    meta_path = source.with_suffix(".json")
    metadata: dict[str, object] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for derived in ("family", "untrained", "parameters", "fp16", "scale_factor"):
        metadata.pop(derived, None)  # export_model writes these afresh
    training = dict(metadata.get("training") or {})  # type: ignore[call-overload]
    earlier = list(training.get("binding_rounds") or [])
    training["binding_rounds"] = [*earlier, *rounds]
    training["binding_steps"] = sum(int(r["steps"]) for r in training["binding_rounds"])
    training.setdefault("ldm_steps", 0)
    stage_seconds = dict(metadata.get("stage_seconds") or {})  # type: ignore[call-overload]
    stage_seconds["binding"] = round(float(stage_seconds.get("binding", 0.0)) + seconds, 1)
    metadata.update(
        name=metadata.get("name", options.name),
        training=training,
        stage_seconds=stage_seconds,
        wall_time_s=round(sum(float(v) for v in stage_seconds.values()), 1),
        started_from=str(source),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=options.device,
        command=options.command or f"python tools/train_bundled_model.py --out DIR --start-from {source}",
    )
    unet_sd, text_sd = final.ema_weights()
    exported = export_model(
        out,
        model,
        unet=unet_sd,
        first_stage=autoencoder.state_dict(),
        cond_stage=text_sd,
        scale_factor=start[2],
        metadata=metadata,
        stem=options.stem,
        fp16=options.fp16,
    )
    emit(f"[export] {exported.checkpoint} ({exported.checkpoint.stat().st_size / 1e6:.1f} MB)")
    return exported


def run_training(options: RunOptions, log: Callable[[str], None] | None = None) -> ExportedModel:
    """Train (or continue) every stage as ``options`` says, then export; returns the export's paths.

    Raises:
        FileExistsError: training state exists in ``options.out`` and ``resume`` is off.
    """
    emit = log or (lambda line: print(line, file=sys.stderr, flush=True))
    preset = _resolve(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.start_from is not None:
        return _continue_release(options, preset, emit)
    out = Path(options.out)
    state_dir, tokenizer = _prepare_output(options, preset)
    ae_path, ldm_path = state_dir / "autoencoder.pt", state_dir / "diffusion.pt"
    dec_path = state_dir / "decoder.pt"
    model = preset.model

    # ---------------------------------------------------------------- stage 1: autoencoder
    ae = AutoencoderTrainer(
        model.first_stage, preset.autoencoder, seed=options.seed, data_seed=options.data_seed, device=options.device
    )
    ae_elapsed = _resume(ae, ae_path, "ae", options, emit)
    if ldm_path.exists() and options.resume:  # a diffusion state exists: the autoencoder is final
        if ae.step < preset.autoencoder.steps:
            emit(f"[ae] a diffusion state exists: keeping the autoencoder at step {ae.step}")
    else:
        ae_elapsed = _train(ae, "ae", preset.autoencoder.steps, ae_path, ae_elapsed, options, emit)
    held_out, held_captions = scene_batch(options.data_seed + HELD_OUT_OFFSET, 0, preset.eval_scenes)
    ae.model.eval()
    ae_psnr = psnr(ae.model, held_out)
    emit(f"[ae] held-out PSNR {ae_psnr:.2f} dB on {preset.eval_scenes} scenes")
    stage1_psnr = ae_psnr
    ae_judge = _judge_reconstructions(ae.model, held_out, held_captions)
    if ae_judge:
        emit(f"[ae] judge on held-out reconstructions: {ae_judge}")
    stage1_judge = dict(ae_judge)

    # ---------------------------------------------------------------- stage 2: diffusion
    ldm = LatentDiffusionTrainer(
        model,
        preset.diffusion,
        ae.model,
        tokenizer,
        seed=options.seed,
        data_seed=options.data_seed,
        device=options.device,
    )
    ldm_elapsed = _resume(ldm, ldm_path, "ldm", options, emit)

    def report_scale_factor() -> None:
        if ldm.step == 1:
            emit(f"[ldm] scale_factor = 1/std(first latent batch) = {ldm.scale_factor:.6g}")

    ldm_elapsed = _train(
        ldm, "ldm", preset.diffusion.steps, ldm_path, ldm_elapsed, options, emit, after_step=report_scale_factor
    )
    if ldm.scale_factor is None:  # zero diffusion steps: still export a loadable model
        first_images, _ = ldm.batch(0)
        ldm.set_scale_factor(ldm.encode(first_images, torch.Generator().manual_seed(options.seed)))
    assert ldm.scale_factor is not None

    # ---------------------------------------------------------------- stage 2b: binding rounds
    bound, rounds, bind_elapsed = _binding_rounds(preset, options, ae.model, tokenizer, ldm, emit)
    final = bound or ldm  # whose EMA weights are exported

    # ---------------------------------------------------------------- stage 3: decoder fine-tune
    dec = DecoderFinetuner(
        ae.model,
        preset.decoder,
        seed=options.seed,
        data_seed=options.data_seed,
        latent_std=1.0 / ldm.scale_factor,
    )
    dec_elapsed = _resume(dec, dec_path, "decoder", options, emit)
    dec_elapsed = _train(dec, "decoder", preset.decoder.steps, dec_path, dec_elapsed, options, emit)
    if dec.step:
        ae.model.eval()
        ae_psnr = psnr(ae.model, held_out)
        emit(f"[decoder] held-out PSNR after the decoder fine-tune {ae_psnr:.2f} dB")
        ae_judge = _judge_reconstructions(ae.model, held_out, held_captions)
        if ae_judge:
            emit(f"[decoder] judge on held-out reconstructions: {ae_judge}")

    # ---------------------------------------------------------------- export
    unet_sd, text_sd = final.ema_weights()
    metadata: dict[str, object] = {
        "name": options.name,
        "preset": options.preset,
        "seed": options.seed,
        "data_seed": options.data_seed,
        "held_out_data_seed": options.data_seed + HELD_OUT_OFFSET,
        "training": {
            "ae_steps": ae.step,
            "ae_batch_size": preset.autoencoder.batch_size,
            "ae_crop": preset.autoencoder.crop,
            "kl_weight": preset.autoencoder.kl_weight,
            "ae_lr": preset.autoencoder.lr,
            "ldm_steps": ldm.step,
            "ldm_batch_size": preset.diffusion.batch_size,
            "ldm_lr": preset.diffusion.lr,
            "uncond_prob": preset.diffusion.uncond_prob,
            "min_snr_gamma": preset.diffusion.min_snr_gamma,
            "ema_decay": preset.diffusion.ema_decay,
            "ema_updates": ldm.ema.num_updates,
            "binding_steps": sum(int(r["steps"]) for r in rounds),  # type: ignore[call-overload]
            "binding_rounds": rounds,
            "decoder_finetune_steps": dec.step,
            "decoder_finetune_batch_size": preset.decoder.batch_size,
            "decoder_finetune_lr": preset.decoder.lr,
            "decoder_finetune_latent_noise": preset.decoder.latent_noise,
        },
        "ae_psnr_db": round(ae_psnr, 3),
        "ae_psnr_db_before_decoder_finetune": round(stage1_psnr, 3),
        "ae_judge_before_decoder_finetune": stage1_judge,
        "ae_judge_on_reconstructions": ae_judge,
        "wall_time_s": round(ae_elapsed + ldm_elapsed + bind_elapsed + dec_elapsed, 1),
        "stage_seconds": {
            "autoencoder": round(ae_elapsed, 1),
            "diffusion": round(ldm_elapsed, 1),
            "binding": round(bind_elapsed, 1),
            "decoder_finetune": round(dec_elapsed, 1),
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": options.device,
        "command": options.command or f"python tools/train_bundled_model.py --out DIR --preset {options.preset}",
    }
    exported = export_model(
        out,
        model,
        unet=unet_sd,
        first_stage=ae.model.state_dict(),
        cond_stage=text_sd,
        scale_factor=ldm.scale_factor,
        metadata=metadata,
        stem=options.stem,
        fp16=options.fp16,
    )
    emit(f"[export] {exported.checkpoint} ({exported.checkpoint.stat().st_size / 1e6:.1f} MB)")
    return exported
