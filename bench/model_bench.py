"""Our UNet and VAE decoder vs diffusers' on the same weights and shapes (eager, CPU by default).

Both models get identical random weights: ours are written in the original
checkpoint layout and converted with diffusers' own single-file converters.
Runs are interleaved (ours, theirs, ours, ...) so drift in machine load hits
both; the median of ``--repeats`` timed runs after ``--warmup`` runs is reported.

    python bench/model_bench.py                     # SD 1.5 shapes, 256x256, CFG batch 2
    python bench/model_bench.py --preset tiny       # seconds; used by the test suite
    python bench/model_bench.py --markdown          # a table row block for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ldm.autoencoder import build_first_stage
from ldm.config import AutoencoderConfig, UNetConfig
from ldm.tiny import TINY_UNET, randomize_weights_
from ldm.unet import UNetModel

SD15_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    num_heads=8,
    legacy=False,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
)
SD15_VAE = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)

TINY_VAE = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

PRESETS = {
    "sd15": (SD15_UNET, SD15_VAE, 256, 2),
    "tiny": (TINY_UNET, TINY_VAE, 64, 2),
}


@dataclass
class Timing:
    part: str
    ours_ms: float
    diffusers_ms: float

    @property
    def ratio(self) -> float:
        """diffusers time / our time: > 1 means ours is faster."""
        return self.diffusers_ms / self.ours_ms


def original_config(unet: UNetConfig, vae: AutoencoderConfig) -> dict:
    """The subset of an original LDM YAML that diffusers' converters read."""
    return {
        "model": {
            "params": {
                "scale_factor": 0.18215,
                "unet_config": {
                    "params": {
                        "in_channels": unet.in_channels,
                        "out_channels": unet.out_channels,
                        "model_channels": unet.model_channels,
                        "channel_mult": list(unet.channel_mult),
                        "num_res_blocks": unet.num_res_blocks,
                        "attention_resolutions": list(unet.attention_resolutions),
                        "num_heads": unet.num_heads,
                        "num_head_channels": unet.num_head_channels,
                        "use_spatial_transformer": True,
                        "transformer_depth": unet.transformer_depth,
                        "context_dim": unet.context_dim,
                        "use_linear_in_transformer": unet.use_linear_in_transformer,
                        "legacy": unet.legacy,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": vae.embed_dim,
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": vae.z_channels,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": vae.ch,
                            "ch_mult": list(vae.ch_mult),
                            "num_res_blocks": vae.num_res_blocks,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                    }
                },
            }
        }
    }


def build_pairs(unet_cfg: UNetConfig, vae_cfg: AutoencoderConfig, size: int):
    """(ours_unet, diffusers_unet, ours_vae, diffusers_vae) with identical weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    gen = torch.Generator().manual_seed(0)
    # non-zero everywhere: the original zero-inits output layers, which would make the parity check vacuous
    ours_unet = randomize_weights_(UNetModel(unet_cfg).eval(), gen)
    ours_vae = randomize_weights_(build_first_stage(vae_cfg).eval(), gen)
    state = {f"model.diffusion_model.{k}": v for k, v in ours_unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in ours_vae.state_dict().items()}
    original = original_config(unet_cfg, vae_cfg)

    ucfg = sfu.create_unet_diffusers_config_from_ldm(original, state, image_size=size)
    ref_unet = UNet2DConditionModel(**ucfg)
    ref_unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, ucfg), strict=True)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(original, state, image_size=size)
    ref_vae = AutoencoderKL(**vcfg)
    ref_vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vcfg), strict=True)
    return ours_unet, ref_unet.eval(), ours_vae, ref_vae.eval()


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, run round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run(preset: str, warmup: int, repeats: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    unet_cfg, vae_cfg, size, batch = PRESETS[preset]
    ours_unet, ref_unet, ours_vae, ref_vae = build_pairs(unet_cfg, vae_cfg, size)
    f = vae_cfg.downsample_factor
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size // f, size // f, generator=gen)
    t = torch.full((batch,), 500, dtype=torch.long)
    ctx = torch.randn(batch, 77, unet_cfg.context_dim, generator=gen)
    z = torch.randn(1, 4, size // f, size // f, generator=gen)

    with torch.inference_mode():  # the two agree before anything is timed
        a, b = ours_unet(x, t, ctx), ref_unet(x, t, encoder_hidden_states=ctx).sample
        unet_err = ((a - b).abs().max() / b.abs().max()).item()
        a, b = ours_vae.decode(z), ref_vae.decode(z).sample
        vae_err = ((a - b).abs().max() / b.abs().max()).item()

    unet_ms = interleaved(
        {"ours": lambda: ours_unet(x, t, ctx), "diffusers": lambda: ref_unet(x, t, encoder_hidden_states=ctx)},
        warmup,
        repeats,
    )
    vae_ms = interleaved(
        {"ours": lambda: ours_vae.decode(z), "diffusers": lambda: ref_vae.decode(z)}, warmup, repeats
    )
    timings = [
        Timing(f"UNet forward, batch {batch}, {size}x{size}", unet_ms["ours"], unet_ms["diffusers"]),
        Timing(f"VAE decode, batch 1, {size}x{size}", vae_ms["ours"], vae_ms["diffusers"]),
    ]
    return {
        "preset": preset,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "max_rel_err": {"unet": unet_err, "vae_decode": vae_err},
        "timings": [asdict(tm) | {"ratio": tm.ratio} for tm in timings],
    }


def markdown(result: dict) -> str:
    lines = [
        f"preset `{result['preset']}`, torch {result['torch']}, {result['threads']} threads, eager fp32",
        "",
        "| part | ours (ms) | diffusers (ms) | diffusers / ours |",
        "|---|---:|---:|---:|",
    ]
    for tm in result["timings"]:
        lines.append(f"| {tm['part']} | {tm['ours_ms']:.1f} | {tm['diffusers_ms']:.1f} | {tm['ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run(args.preset, args.warmup, args.repeats, args.threads)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
