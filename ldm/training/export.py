"""Write a trained model in the original single-file layout, loadable by :func:`ldm.pipeline.load_pipeline`.

Files written into the output folder (``<stem>`` defaults to the model name)::

    <stem>.safetensors   model.diffusion_model.*  UNet (EMA weights)
                         first_stage_model.*      KL autoencoder
                         cond_stage_model.*       BERTEmbedder (EMA weights)
                         scale_factor             root buffer, 1/std of the first latent batch
                         betas, alphas_cumprod    root buffers of the training schedule
                         global_step              diffusion steps trained
    <stem>.yaml          original-style inference config (model_config_to_yaml)
    <stem>.json          {"name", "untrained": false, training steps, data seed, ...}
    tokenizer/vocab.txt  WordPiece vocabulary of the caption grammar
    MODEL_CARD.md        what the model is, how it was trained, how to reproduce it

EMA convention: the EMA weights of the UNet and of the text encoder are stored
*as the released weights* under the plain prefixes, and the YAML says
``use_ema: false``, like the EMA-only Stable Diffusion v1 checkpoints. No
``model_ema.*`` keys are written (the original ``LitEma`` covers only the UNet,
while our text encoder is averaged too). With ``fp16`` the module weights are
stored in half precision (the loader casts them back); root buffers stay float32.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.config import ModelConfig
from ldm.data.shapes import write_vocab
from ldm.loading.config_yaml import model_config_to_yaml
from ldm.noise_schedule import alphas_cumprod, make_beta_schedule

__all__ = ["ExportedModel", "export_model", "model_card"]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """Paths of an export."""

    checkpoint: Path
    config: Path
    metadata: Path
    tokenizer_dir: Path
    model_card: Path


def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[prefix + key] = value.contiguous()
    return out


def _count(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in sd.values())


def _binding_lines(train: Mapping[str, object]) -> list[str]:
    """Model-card lines of stage 2b's rounds (none when it was skipped)."""
    rounds = train.get("binding_rounds") or []
    assert isinstance(rounds, list)
    lines = []
    for k, r in enumerate(rounds, start=1):
        start = "stage 2's" if k == 1 else f"round {k - 1}'s"
        lines.append(
            f"- Stage 2b (binding), round {k}: {r['steps']} more diffusion steps x {r['batch_size']} scenes from"
            f" {start} EMA weights, on scene stream `data_seed={r['data_seed']}` with two objects in"
            f" {float(r['two_object_prob'] if r['two_object_prob'] is not None else 0.5):.0%} of scenes"
            f" (stage 2: 50%), where the model learns which attributes go with which object; fresh AdamW,"
            f" lr {r['lr']}, a fresh EMA (decay {r['ema_decay']})."
        )
    return lines


def model_card(config: ModelConfig, metadata: Mapping[str, object], parameters: Mapping[str, int]) -> str:
    """Markdown model card from the config and the training metadata."""
    u, a, c = config.unet, config.first_stage, config.cond_stage
    train = metadata.get("training", {})
    assert isinstance(train, Mapping)
    lines = [
        f"# {metadata.get('name', 'model')}",
        "",
        "A small text-to-image latent diffusion model (Rombach et al. 2022) trained from scratch",
        "on the procedural captioned scenes of `ldm/data/shapes.py` (64x64 px, one or two",
        "coloured shapes on a plain background), in the original LDM checkpoint layout.",
        "",
        "## Architecture",
        "",
        f"- KL autoencoder f={a.downsample_factor}: 64x64x3 -> {config.image_size}x{config.image_size}"
        f"x{a.embed_dim} latents (ch {a.ch}, ch_mult {list(a.ch_mult)}, {a.num_res_blocks} res block(s) per level);"
        f" {parameters.get('first_stage', 0) / 1e6:.2f} M parameters.",
        f"- UNet: model_channels {u.model_channels}, channel_mult {list(u.channel_mult)}, "
        f"{u.num_res_blocks} res block(s) per level, spatial transformers (depth {u.transformer_depth}, "
        f"{u.num_heads} heads) with cross-attention at ds {list(u.attention_resolutions)}, "
        f"context_dim {u.context_dim}; {parameters.get('unet', 0) / 1e6:.2f} M parameters.",
    ]
    if c is not None and hasattr(c, "n_layer"):
        lines.append(
            f"- Text encoder: LDM BERTEmbedder, {c.n_layer} layers x {c.n_embed} "  # type: ignore[union-attr]
            f"({c.heads} heads x {c.dim_head}), vocabulary of {c.vocab_size} WordPiece tokens "  # type: ignore[union-attr]
            f"(`tokenizer/vocab.txt`), trained jointly from scratch; "
            f"{parameters.get('cond_stage', 0) / 1e6:.2f} M parameters."
        )
    lines += [
        f"- Schedule: {config.beta_schedule} {config.linear_start}-{config.linear_end}, T={config.timesteps}, "
        f"{config.parameterization}-prediction; scale_factor {config.scale_factor:.6g} (1/std of the first "
        "training batch of latents, `scale_by_std`).",
        "",
        "## Training",
        "",
        f"- Data: scene stream `data_seed={metadata.get('data_seed')}` of `ldm.data.shapes.sample_scene`"
        " (fresh scenes every step, none repeated).",
        f"- Autoencoder: {train.get('ae_steps')} steps x {train.get('ae_batch_size')} images"
        f" ({train.get('ae_crop') or 64}px crops), L1 + {train.get('kl_weight')} KL, AdamW.",
        f"- Diffusion: {train.get('ldm_steps')} steps x {train.get('ldm_batch_size')} scenes, AdamW lr"
        f" {train.get('ldm_lr')}, caption dropped to \"\" with p={train.get('uncond_prob')} for"
        " classifier-free guidance, uniform t"
        + (
            f", Min-SNR-gamma loss weights (gamma {train.get('min_snr_gamma')})."
            if train.get("min_snr_gamma")
            else "."
        ),
        *_binding_lines(train),
        *(
            [
                f"- Decoder fine-tune (like `sd-vae-ft-mse`): {train.get('decoder_finetune_steps')} steps x "
                f"{train.get('decoder_finetune_batch_size')} full 64x64 images, MSE + 0.5 L1, lr "
                f"{train.get('decoder_finetune_lr')}, latents perturbed by Gaussian noise of up to "
                f"{train.get('decoder_finetune_latent_noise', 0)} latent standard deviations (so that slightly "
                "off-manifold sampler outputs decode cleanly); the encoder, and so the latent space, is unchanged."
            ]
            if train.get("decoder_finetune_steps")
            else []
        ),
        f"- EMA (decay {train.get('ema_decay')}, LitEma warm-up) of the UNet and the text encoder; the"
        " checkpoint holds the EMA weights as its released weights (`use_ema: false`, no `model_ema.*`).",
        f"- Seed {metadata.get('seed')}; wall time {metadata.get('wall_time_s', 'n/a')} s on device"
        f" {metadata.get('device', 'cpu')} with {metadata.get('threads', '?')} CPU thread(s).",
    ]
    if "ae_psnr_db" in metadata:
        lines.append(f"- Autoencoder PSNR on held-out scenes (final decoder): {float(metadata['ae_psnr_db']):.2f} dB.")  # type: ignore[arg-type]
    if metadata.get("ae_judge_on_reconstructions"):
        lines.append(
            "- Judge accuracy on held-out autoencoder reconstructions (an upper bound for generated images): "
            f"{metadata['ae_judge_on_reconstructions']}."
        )
    lines += [
        "",
        "## Reproduce",
        "",
        "Last invocation (a resumed run shows its final `--resume` call):",
        "",
        "```",
        str(metadata.get("command", "python tools/train_bundled_model.py --out DIR --preset bundled")),
        "```",
        "",
        "## Use",
        "",
        "It is the default model of `ldm-serve up` and `ldm-serve generate` (64x64; 25 DDIM steps and",
        "guidance 5 are what the evaluation uses). Prompts follow the caption grammar, e.g.",
        "`a big red circle on the left of a small blue square, on a white background` or",
        "`a small yellow star at the top, on a black background`.",
        "",
        "## Limitations",
        "",
        "It only knows the caption grammar of `ldm/data/shapes.py` (shapes, colours, sizes, positions,",
        "backgrounds); other words map to `[UNK]`. Images are 64x64. It is a demonstration and test",
        "model for the server, not a general image generator.",
        "",
    ]
    return "\n".join(lines)


def export_model(
    directory: str | Path,
    config: ModelConfig,
    *,
    unet: Mapping[str, torch.Tensor],
    first_stage: Mapping[str, torch.Tensor],
    cond_stage: Mapping[str, torch.Tensor],
    scale_factor: float,
    metadata: Mapping[str, object],
    stem: str | None = None,
    fp16: bool = True,
) -> ExportedModel:
    """Write checkpoint, YAML, JSON, tokenizer and model card; see the module docstring.

    ``config`` is written with ``scale_factor`` set, ``scale_by_std: true`` and
    ``use_ema: false``. ``metadata`` must hold ``name``; ``untrained`` is forced to false.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    name = str(metadata["name"])
    stem = stem or name
    config = dataclasses.replace(config, scale_factor=float(scale_factor), scale_by_std=True, use_ema=False)
    dtype = torch.float16 if fp16 else None

    betas = make_beta_schedule(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end)
    state: dict[str, torch.Tensor] = {
        **_prefixed(UNET_PREFIX, unet, dtype),
        **_prefixed(FIRST_STAGE_PREFIX, first_stage, dtype),
        **_prefixed(COND_STAGE_PREFIX, cond_stage, dtype),
        "scale_factor": torch.tensor(float(scale_factor), dtype=torch.float32),
        "betas": betas.to(torch.float32),
        "alphas_cumprod": alphas_cumprod(betas),
    }
    meta: dict[str, object] = {**metadata, "untrained": False, "family": config.family}
    training = meta.get("training")
    if isinstance(training, Mapping) and "ldm_steps" in training:
        steps = int(training["ldm_steps"]) + int(training.get("binding_steps", 0))  # type: ignore[call-overload]
        state["global_step"] = torch.tensor(steps, dtype=torch.int64)  # all diffusion steps (stages 2 and 2b)
    ckpt = out / f"{stem}.safetensors"
    save_file(state, str(ckpt), metadata={"format": "pt"})

    yaml_path = ckpt.with_suffix(".yaml")
    yaml_path.write_text(model_config_to_yaml(config), encoding="utf-8")
    parameters = {"unet": _count(unet), "first_stage": _count(first_stage), "cond_stage": _count(cond_stage)}
    meta["parameters"] = parameters
    meta["fp16"] = fp16
    meta["scale_factor"] = float(scale_factor)
    json_path = ckpt.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok = out / "tokenizer"
    write_vocab(tok)
    card = out / "MODEL_CARD.md"
    card.write_text(model_card(config, meta, parameters), encoding="utf-8")
    return ExportedModel(checkpoint=ckpt, config=yaml_path, metadata=json_path, tokenizer_dir=tok, model_card=card)
