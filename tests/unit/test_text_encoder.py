"""A checkpoint pruned of its text encoder, with the encoder given separately (files in the real formats)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.config import CLIPTextConfig, ModelConfig
from ldm.encoders import build_cond_stage_model
from ldm.loading.checkpoint import read_state_dict
from ldm.loading.detect import infer_model_config
from ldm.loading.loader import load_model
from ldm.pipeline import GenerationRow, load_pipeline
from ldm_serve.errors import CheckpointError, ConfigError
from tests.checkpoints import TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, write_original_checkpoint
from tests.tokenizer_files import write_clip_tokenizer

COND = "cond_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SIZE = 32
ROWS = [
    GenerationRow("a red cat", seed=11, negative_prompt="dog", steps=4, guidance_scale=5.0),
    GenerationRow("blue house", seed=4, steps=2, guidance_scale=1.0),
]


def _split(full: Path, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write ``full`` pruned of its text encoder to ``out/model.safetensors``; return it and the encoder."""
    sd = read_state_dict(full)
    out.mkdir(parents=True, exist_ok=True)
    pruned = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith(COND)}, str(pruned))
    return pruned, {k: v.contiguous() for k, v in sd.items() if k.startswith(COND)}


def _transformers_config(cfg: CLIPTextConfig) -> dict[str, object]:
    return {
        "architectures": ["CLIPTextModel"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
    }


def _diffusers_text_encoder(root: Path, cfg: CLIPTextConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A diffusers ``text_encoder/`` (config.json + model.safetensors, text_model.* keys) with ``tokenizer/``."""
    folder = root / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_transformers_config(cfg)))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    write_clip_tokenizer(root / "tokenizer")
    if cfg.pad_token == "!":
        (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    return folder


def _images(pipe) -> list[np.ndarray]:  # noqa: ANN001 - a LatentDiffusionPipeline
    return [np.asarray(img) for img in pipe.generate(ROWS, SIZE, SIZE)]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(full file, pruned file with tokenizer/ beside it, the pruned text-encoder tensors)."""
    root = tmp_path_factory.mktemp("sd1")
    full = write_original_checkpoint(TINY_SD1, root / "full" / "sd1", fmt="safetensors", yaml=False)
    pruned, text = _split(full, root / "pruned")
    write_clip_tokenizer(root / "pruned" / "tokenizer")
    return full, pruned, text


def test_pruned_checkpoint_is_refused_with_the_remedy(sd1, tmp_path: Path) -> None:
    _, pruned, _ = sd1
    with pytest.raises(ConfigError, match="text_encoder=PATH"):
        load_model(pruned)
    # with its YAML the family is known, and the error still names the remedy (not a list of missing keys)
    shutil.copy(pruned, tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(_yaml(TINY_SD1))
    with pytest.raises(CheckpointError, match="text_encoder=PATH"):
        load_model(tmp_path / "m.safetensors", tokenizer_dir=pruned.parent / "tokenizer")


def _yaml(config: ModelConfig) -> str:
    from ldm.loading.config_yaml import model_config_to_yaml

    return model_config_to_yaml(config)


def test_pruned_sd1_plus_text_encoder_file_matches_the_full_file(sd1, tmp_path: Path) -> None:
    full, pruned, text = sd1
    te = tmp_path / "text_encoder.safetensors"
    save_file(text, str(te))
    ours = load_pipeline(pruned, text_encoder=te)
    assert ours.model.config == TINY_SD1
    for a, b in zip(_images(ours), _images(load_pipeline(full)), strict=True):
        assert np.array_equal(a, b)


def test_pruned_sd1_plus_diffusers_text_encoder_matches_the_full_file(sd1, tmp_path: Path) -> None:
    full, pruned, text = sd1
    weights = {k[len(SD1_TEXT) :]: v for k, v in text.items()}  # CLIPTextModel's text_model.* names
    folder = _diffusers_text_encoder(tmp_path / "hub", TINY_SD1.cond_stage, weights)  # type: ignore[arg-type]
    alone = tmp_path / "alone" / "model.safetensors"  # no tokenizer/ beside: the folder's is used
    alone.parent.mkdir()
    shutil.copy(pruned, alone)
    ours = load_pipeline(alone, text_encoder=folder)
    assert ours.model.config == TINY_SD1
    for a, b in zip(_images(ours), _images(load_pipeline(full)), strict=True):
        assert np.array_equal(a, b)


def test_pruned_sd2_plus_diffusers_text_encoder_is_sd2(tmp_path: Path) -> None:
    """A transformers-layout OpenCLIP (exact GELU, last layer dropped) makes the model SD 2 (its config.json)."""
    full = write_original_checkpoint(TINY_SD2, tmp_path / "full" / "sd2", fmt="safetensors", yaml=False)
    pruned, _ = _split(full, tmp_path / "pruned")
    cfg: CLIPTextConfig = TINY_SD2.cond_stage  # type: ignore[assignment]
    encoder = load_pipeline(full).model.cond_stage
    assert encoder is not None
    last = cfg.num_hidden_layers - 1  # penultimate layer = the first n - 1 layers + final norm
    weights = {k: v for k, v in encoder.state_dict().items() if f"layers.{last}." not in k}
    hf_cfg = CLIPTextConfig(**{**cfg.__dict__, "num_hidden_layers": last, "layer": "last"})
    folder = _diffusers_text_encoder(tmp_path / "hub", hf_cfg, weights)
    model = load_model(pruned, text_encoder=folder, tokenizer_dir=tmp_path / "hub" / "tokenizer")
    assert model.config.family == "sd2" and model.config.cond_stage == hf_cfg
    assert model.config.unet == TINY_SD2.unet and model.config.parameterization == "v"
    ids = torch.tensor([[1, 5, 9, 2] + [0] * (cfg.max_position_embeddings - 4)])
    reference = build_cond_stage_model(cfg)
    reference.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(model.cond_stage(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_pruned_sd_inpainting_is_not_ldm_inpainting(tmp_path: Path) -> None:
    """A 9-channel cross-attending UNet without encoder: refused, not the LDM inpainting_big family."""
    full = write_original_checkpoint(TINY_SD1_INPAINT, tmp_path / "full" / "inp", fmt="safetensors", yaml=False)
    pruned, text = _split(full, tmp_path / "pruned")
    with pytest.raises(ConfigError, match="cross-attends") as info:
        infer_model_config(read_state_dict(pruned))
    assert "--text-encoder" in str(info.value)
    # LDM inpainting saves its first stage as cond stage; such a copy is no text encoder either
    sd = read_state_dict(pruned)
    copy = {COND + k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with pytest.raises(ConfigError, match="cross-attends"):
        infer_model_config({**sd, **copy})
    # with the encoder given separately it is SD inpainting, and it loads
    te = tmp_path / "te.safetensors"
    save_file(text, str(te))
    write_clip_tokenizer(pruned.parent / "tokenizer")
    model = load_model(pruned, text_encoder=te)
    assert model.config == TINY_SD1_INPAINT


def test_strictness_for_everything_given(sd1, tmp_path: Path) -> None:
    full, pruned, text = sd1
    te = tmp_path / "te.safetensors"
    save_file(text, str(te))
    with pytest.raises(CheckpointError, match="of its own"):  # the full file has an encoder already
        load_model(full, text_encoder=te)
    unet_key = next(k for k in read_state_dict(full) if k.startswith("model.diffusion_model."))
    save_file({**text, unet_key: read_state_dict(full)[unet_key]}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="not a text encoder"):
        load_model(pruned, text_encoder=tmp_path / "mixed.safetensors")
    truncated = dict(list(text.items())[:-3])
    save_file(truncated, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(pruned, text_encoder=tmp_path / "short.safetensors")
    hf = tmp_path / "hf" / "model.safetensors"  # transformers layout without its config.json
    hf.parent.mkdir()
    save_file({k[len(SD1_TEXT) :]: v for k, v in text.items()}, str(hf))
    with pytest.raises(ConfigError, match="config.json"):
        load_model(pruned, text_encoder=hf)


def test_cli_text_encoder_flag(sd1, tmp_path: Path) -> None:
    _, pruned, text = sd1
    te = tmp_path / "te.safetensors"
    save_file(text, str(te))
    out = tmp_path / "out.png"
    base = [sys.executable, "-m", "launcher", "generate", "--checkpoint", str(pruned), "--prompt", "a cat",
            "--steps", "2", "--seed", "1", "--width", "64", "--height", "64", "--out", str(out)]  # fmt: skip
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--text-encoder" in refused.stderr
    proc = subprocess.run([*base, "--text-encoder", str(te)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
