"""Reading checkpoints safely, splitting them, strict loading and ``load_model``."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.loading.checkpoint import (
    DEFAULT_IGNORED_KEYS,
    ema_key,
    load_component_strict,
    read_state_dict,
    redot_unet_key,
    split_components,
)
from ldm.loading.config_yaml import model_config_to_yaml
from ldm.loading.loader import load_model, model_alphas_cumprod
from ldm.tiny import randomize_weights_
from ldm.unet import UNetModel
from ldm_serve.errors import CheckpointError, ConfigError, TokenizerFilesMissing
from tests.checkpoints import (
    ALL_TINY,
    TINY_LDM_CLASS,
    TINY_LDM_INPAINT,
    TINY_LDM_TXT2IMG,
    TINY_SD1,
    TINY_SD2,
    original_state_dict,
    write_original_checkpoint,
)
from tests.tokenizer_files import write_clip_tokenizer

UNET = "model.diffusion_model."

# --------------------------------------------------------------------------- reading


def test_ckpt_safetensors_nested_and_flat_hold_equal_tensors(tmp_path: Path) -> None:
    paths = [
        write_original_checkpoint(TINY_SD1, tmp_path / "nested", fmt="ckpt", nested=True),
        write_original_checkpoint(TINY_SD1, tmp_path / "flat", fmt="ckpt", nested=False),
        write_original_checkpoint(TINY_SD1, tmp_path / "st", fmt="safetensors"),
    ]
    nested, flat, st = (read_state_dict(p) for p in paths)
    assert int(nested.pop("global_step")) == 4321
    assert "global_step" not in flat and "global_step" not in st
    assert nested.keys() == flat.keys() == st.keys()
    assert any(k.startswith(UNET) for k in nested)
    for key, tensor in nested.items():
        assert torch.equal(tensor, flat[key]) and torch.equal(tensor, st[key]), key


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.ckpt")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        read_state_dict(odd)


def _fake_class(monkeypatch: pytest.MonkeyPatch, module_name: str, cls: type) -> type:
    """Register ``cls`` as ``module_name.<cls name>`` (parents included) so pickle can *write* a reference to it."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls.__module__ = module_name
    cls.__qualname__ = cls.__name__
    setattr(sys.modules[module_name], cls.__name__, cls)
    return cls


@pytest.fixture
def fake_lightning(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in ``pytorch_lightning`` ModelCheckpoint class (the real package is not installed)."""

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss_simple_ema"
            self.best_model_score = torch.tensor(0.125)
            self.kth_value = np.float64(0.5)

    return _fake_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint)


def test_lightning_checkpoint_with_callback_and_numpy_scalars_loads(
    tmp_path: Path, fake_lightning: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = {"model.diffusion_model.out.2.bias": torch.arange(3.0)}
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": sd,
            "global_step": np.int64(470000),
            "epoch": 6,
            "pytorch-lightning_version": "1.4.2",
            # PL 1.4 keys callback states by class; later versions by a string, holding instances
            "callbacks": {
                fake_lightning: {"best_model_score": np.float64(0.25)},
                "ModelCheckpoint{}": fake_lightning(),
            },
        },
        path,
    )
    monkeypatch.undo()  # reading must not need pytorch_lightning at all
    assert "pytorch_lightning" not in sys.modules
    loaded = read_state_dict(path)
    assert int(loaded.pop("global_step")) == 470000
    assert loaded.keys() == sd.keys() and torch.equal(
        loaded["model.diffusion_model.out.2.bias"], sd["model.diffusion_model.out.2.bias"]
    )
    assert "pytorch_lightning" not in sys.modules


def test_pickled_function_call_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"betas": torch.ones(2)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert "unrestricted unpickling" in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()
    # the payload is real: unrestricted unpickling would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_lightning_class_outside_the_allow_list_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class WandbLogger:
        pass

    _fake_class(monkeypatch, "pytorch_lightning.loggers.wandb", WandbLogger)
    path = tmp_path / "logger.ckpt"
    torch.save({"state_dict": {"betas": torch.ones(2)}, "logger": WandbLogger()}, path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="WandbLogger"):
        read_state_dict(path)


# --------------------------------------------------------------------------- splitting / EMA


@pytest.mark.parametrize("family", list(ALL_TINY))
def test_redot_inverts_litema_names(family: str) -> None:
    keys = list(UNetModel(ALL_TINY[family].unet).state_dict())
    for key in keys:
        assert redot_unet_key(ema_key(key)[len("model_ema.") :]) == key


def test_split_components_picks_ema_or_raw() -> None:
    sd = original_state_dict(TINY_SD1, ema=True)
    raw = {k[len(UNET) :]: v for k, v in sd.items() if k.startswith(UNET)}

    ema = split_components(sd, use_ema=None)
    assert ema.used_ema and ema.unet.keys() == raw.keys()
    for key, tensor in ema.unet.items():
        assert torch.equal(tensor, sd[ema_key(key)])
        assert not torch.equal(tensor, raw[key]) or tensor.numel() == 0 or tensor.abs().sum() == 0
    assert ema.unexpected == [] and ema.global_step is None
    assert set(ema.buffers) >= {"betas", "alphas_cumprod"}
    assert "transformer.text_model.embeddings.token_embedding.weight" in ema.cond_stage
    assert "encoder.conv_in.weight" in ema.first_stage

    plain = split_components(sd, use_ema=False)
    assert not plain.used_ema
    assert all(torch.equal(plain.unet[k], raw[k]) for k in raw)


def test_split_components_ema_requirements() -> None:
    no_ema = original_state_dict(TINY_LDM_CLASS)
    with pytest.raises(CheckpointError, match="no EMA"):
        split_components(no_ema, use_ema=True)
    assert not split_components(no_ema, use_ema=None).used_ema

    ema_only = original_state_dict(TINY_LDM_CLASS, ema_only=True)
    with pytest.raises(CheckpointError, match="only EMA"):
        split_components(ema_only, use_ema=False)
    keys = list(UNetModel(TINY_LDM_CLASS.unet).state_dict())
    parts = split_components(ema_only, use_ema=None, unet_keys=keys)
    assert parts.used_ema and sorted(parts.unet) == sorted(keys)


def test_split_components_reports_foreign_keys() -> None:
    sd = original_state_dict(TINY_LDM_CLASS)
    sd["control_model.input_blocks.0.0.weight"] = torch.zeros(1)
    sd["model_ema.not_a_unet_weight"] = torch.zeros(1)
    parts = split_components(sd, use_ema=False, unet_keys=list(UNetModel(TINY_LDM_CLASS.unet).state_dict()))
    assert parts.unexpected == ["control_model.input_blocks.0.0.weight", "model_ema.not_a_unet_weight"]


# --------------------------------------------------------------------------- strict loading


@pytest.fixture
def unet_and_weights() -> tuple[UNetModel, dict[str, torch.Tensor]]:
    module = UNetModel(TINY_LDM_CLASS.unet)
    weights = {
        k: v.clone() for k, v in randomize_weights_(UNetModel(TINY_LDM_CLASS.unet), seed=3).state_dict().items()
    }
    return module, weights


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_strict_missing(unet_and_weights: tuple) -> None:
    module, weights = unet_and_weights
    before = _snapshot(module)
    del weights["out.2.bias"]
    with pytest.raises(CheckpointError, match="unet") as info:
        load_component_strict(module, weights, "unet")
    assert info.value.missing == ["out.2.bias"] and not info.value.unexpected and not info.value.mismatched
    assert "out.2.bias" in str(info.value)
    assert _unchanged(module, before)


def test_strict_unexpected(unet_and_weights: tuple) -> None:
    module, weights = unet_and_weights
    before = _snapshot(module)
    weights["input_blocks.1.1.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as info:
        load_component_strict(module, weights, "unet")
    assert info.value.unexpected == ["input_blocks.1.1.extra.weight"] and not info.value.missing
    assert _unchanged(module, before)


def test_strict_mismatched(unet_and_weights: tuple) -> None:
    module, weights = unet_and_weights
    before = _snapshot(module)
    weights["input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_component_strict(module, weights, "unet")
    assert len(info.value.mismatched) == 1 and info.value.mismatched[0].startswith("input_blocks.0.0.weight")
    assert "(32, 4, 3, 3)" in info.value.mismatched[0] and "(32, 3, 3, 3)" in info.value.mismatched[0]
    assert _unchanged(module, before)


def test_strict_ignore_patterns_and_dtype_cast(unet_and_weights: tuple) -> None:
    module, weights = unet_and_weights
    weights["loss.logvar"] = torch.zeros(())
    with pytest.raises(CheckpointError, match="loss.logvar"):
        load_component_strict(module, weights, "unet")
    module.half()
    load_component_strict(module, weights, "unet", ignore=("loss.*",))
    for key, tensor in module.state_dict().items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, weights[key].half()), key


# --------------------------------------------------------------------------- load_model


def _written_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(UNET) :]: v for k, v in sd.items() if k.startswith(UNET)}


@pytest.mark.parametrize("family", list(ALL_TINY))
def test_load_model_each_family(family: str, tmp_path: Path) -> None:
    config = ALL_TINY[family]
    path = write_original_checkpoint(config, tmp_path / "model", seed=5)
    written = read_state_dict(path)
    model = load_model(path)
    assert model.config == config
    assert model.global_step == 4321 and not model.used_ema and model.source == str(path)
    for module in (model.unet, model.first_stage, model.cond_stage):
        if module is not None:
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())
    for key, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, written[UNET + key]), key
    for key, tensor in model.first_stage.state_dict().items():
        assert torch.equal(tensor, written["first_stage_model." + key]), key
    assert (model.cond_stage is None) == (config.cond_stage is None)
    assert (model.tokenizer is not None) == (family in ("sd1", "sd1-inpaint", "sd2", "ldm-txt2img"))
    assert model.alphas_cumprod.dtype == torch.float32 and model.alphas_cumprod.shape == (1000,)
    assert torch.allclose(model.alphas_cumprod, written["alphas_cumprod"], rtol=0, atol=1e-7)
    assert model.scale_factor == config.scale_factor


def test_text_encoder_weights_arrive(tmp_path: Path) -> None:
    """SD 1 CLIP keys lose ``transformer.``; SD 2 OpenCLIP keys are converted."""
    for config in (TINY_SD1, TINY_SD2):
        path = write_original_checkpoint(config, tmp_path / config.family / "m")
        written = read_state_dict(path)
        model = load_model(path)
        token = model.cond_stage.state_dict()["text_model.embeddings.token_embedding.weight"]
        source = (
            "transformer.text_model.embeddings.token_embedding.weight"
            if config is TINY_SD1
            else "model.token_embedding.weight"
        )
        assert torch.equal(token, written["cond_stage_model." + source])


def test_yaml_beside_checkpoint_wins_over_detection(tmp_path: Path) -> None:
    eps = dataclasses.replace(TINY_SD2, parameterization="eps", image_size=64)
    path = write_original_checkpoint(eps, tmp_path / "m", fmt="safetensors")
    assert load_model(path).config == eps  # detection alone would say "v"
    path.with_suffix(".yaml").unlink()
    assert load_model(path).config == TINY_SD2
    assert load_model(path, prediction_type="epsilon").config == eps


def test_explicit_config_forms(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_LDM_CLASS, tmp_path / "m", yaml=False)
    yaml_path = tmp_path / "other.yaml"
    yaml_path.write_text(model_config_to_yaml(TINY_LDM_CLASS), encoding="utf-8")
    import yaml

    for config in (TINY_LDM_CLASS, yaml_path, str(yaml_path), yaml.safe_load(yaml_path.read_text())):
        assert load_model(path, config).config == TINY_LDM_CLASS


def test_load_model_ema_selection(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_LDM_INPAINT, tmp_path / "m", ema=True)
    written = read_state_dict(path)
    model = load_model(path)
    assert model.used_ema
    for key, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, written[ema_key(key)]), key
    raw = load_model(path, use_ema=False)
    assert not raw.used_ema
    for key, tensor in raw.unet.state_dict().items():
        assert torch.equal(tensor, written[UNET + key]), key
    assert not torch.equal(model.unet.out[2].weight, raw.unet.out[2].weight)


def test_load_model_ema_only(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_SD1, tmp_path / "m", ema_only=True)
    written = read_state_dict(path)
    model = load_model(path)
    assert model.used_ema
    assert torch.equal(
        model.unet.input_blocks[1][1].proj_in.weight, written[ema_key("input_blocks.1.1.proj_in.weight")]
    )
    with pytest.raises(CheckpointError, match="only EMA"):
        load_model(path, use_ema=False)


def test_checkpoint_of_another_architecture_raises(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_SD1, tmp_path / "m", yaml=False)
    write_original_checkpoint(TINY_LDM_INPAINT, tmp_path / "ldm" / "inpaint", tokenizer=False)
    with pytest.raises((CheckpointError, ConfigError)):
        load_model(path, tmp_path / "ldm" / "inpaint.yaml")
    # same schedule, different UNet / encoder: the strict comparison lists the differences
    with pytest.raises(CheckpointError) as info:
        load_model(path, TINY_LDM_TXT2IMG)
    assert info.value.missing or info.value.unexpected or info.value.mismatched


def test_schedule_contradicting_checkpoint_raises(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_LDM_CLASS, tmp_path / "m", yaml=False)
    with pytest.raises(ConfigError, match="noise schedule"):
        load_model(path, dataclasses.replace(TINY_LDM_CLASS, linear_end=0.012))


def test_foreign_modules_in_checkpoint_raise(tmp_path: Path) -> None:
    sd = original_state_dict(TINY_LDM_CLASS)
    sd["control_model.zero_convs.0.0.weight"] = torch.zeros(1)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, TINY_LDM_CLASS)
    assert info.value.unexpected == ["control_model.zero_convs.0.0.weight"]


def test_missing_tokenizer_files_are_named(tmp_path: Path) -> None:
    path = write_original_checkpoint(TINY_SD1, tmp_path / "m", tokenizer=False)
    with pytest.raises(TokenizerFilesMissing) as info:
        load_model(path)
    assert "vocab.json" in str(info.value) and "merges.txt" in str(info.value)
    elsewhere = write_clip_tokenizer(tmp_path / "elsewhere")
    assert load_model(path, tokenizer_dir=elsewhere).tokenizer is not None


def test_dtype_and_stored_scale_factor(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY_LDM_CLASS, scale_by_std=True, scale_factor=0.5)
    path = write_original_checkpoint(config, tmp_path / "m")
    written = read_state_dict(path)
    model = load_model(path, dtype=torch.float16)
    assert model.scale_factor == 0.5
    assert model.unet.out[2].weight.dtype == torch.float16
    assert torch.equal(model.unet.out[2].weight, written[UNET + "out.2.weight"].half())
    assert torch.equal(model.alphas_cumprod, model_alphas_cumprod(config))
    del written["scale_factor"]
    torch.save(written, tmp_path / "no_scale.ckpt")
    with pytest.raises(CheckpointError, match="scale_factor"):
        load_model(tmp_path / "no_scale.ckpt", config)


def test_default_ignores_cover_training_leftovers(tmp_path: Path) -> None:
    sd = original_state_dict(TINY_SD1)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, path)
    write_clip_tokenizer(tmp_path / "tokenizer")
    assert load_model(path, TINY_SD1).config == TINY_SD1
    assert "loss.*" in DEFAULT_IGNORED_KEYS["first_stage"]
