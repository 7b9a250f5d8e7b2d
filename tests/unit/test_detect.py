"""Shape-based config inference reproduces every tiny family config from a written file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ldm.loading.checkpoint import read_state_dict
from ldm.loading.detect import infer_model_config
from ldm_serve.errors import ConfigError
from tests.checkpoints import (
    ALL_TINY,
    TINY_LDM_CLASS,
    TINY_LDM_INPAINT,
    TINY_SD1,
    TINY_SD1_INPAINT,
    TINY_SD2,
    original_state_dict,
    write_original_checkpoint,
)


@pytest.mark.parametrize("family", list(ALL_TINY))
def test_detection_reproduces_tiny_config(family: str, tmp_path: Path) -> None:
    config = ALL_TINY[family]
    path = write_original_checkpoint(
        config, tmp_path / "model", fmt="safetensors", yaml=False, tokenizer=False
    )
    assert infer_model_config(read_state_dict(path)) == config


def test_detection_of_ema_only_checkpoint(tmp_path: Path) -> None:
    path = write_original_checkpoint(
        TINY_LDM_INPAINT, tmp_path / "m", ema_only=True, yaml=False, tokenizer=False
    )
    sd = read_state_dict(path)
    assert not any(k.startswith("model.diffusion_model.") for k in sd)
    assert infer_model_config(sd) == TINY_LDM_INPAINT


def test_detection_reads_other_unet_options() -> None:
    """Depth, linear projection, scale-shift norm and class labels come from shapes too."""
    unet = dataclasses.replace(
        TINY_LDM_CLASS.unet,
        transformer_depth=2,
        use_linear_in_transformer=True,
        use_scale_shift_norm=True,
        num_res_blocks=2,
        channel_mult=(1, 1, 2),
        attention_resolutions=(4, 1),
        num_classes=5,
    )
    config = dataclasses.replace(TINY_LDM_CLASS, unet=unet)
    assert infer_model_config(original_state_dict(config)) == config


def test_sd2_prediction_type() -> None:
    sd = original_state_dict(TINY_SD2)
    assert infer_model_config(sd).parameterization == "v"  # diffusers' heuristic default for SD 2
    as_eps = dataclasses.replace(TINY_SD2, parameterization="eps", image_size=64)
    assert infer_model_config(sd, prediction_type="epsilon") == as_eps
    assert infer_model_config(sd, prediction_type="v_prediction") == TINY_SD2
    sd["global_step"] = torch.tensor(875000)  # the SD 2.0-base release
    assert infer_model_config(sd) == as_eps
    with pytest.raises(ConfigError, match="prediction_type"):
        infer_model_config(sd, prediction_type="sample")


def test_stored_scale_factor_means_scale_by_std() -> None:
    sd = original_state_dict(TINY_LDM_CLASS)
    sd["scale_factor"] = torch.tensor(0.75)
    config = infer_model_config(sd)
    assert (config.scale_by_std, config.scale_factor) == (True, 0.75)


def _assert_unknown(sd: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ConfigError) as info:
        infer_model_config(sd)
    message = str(info.value)
    assert "sd1" in message and "ldm-inpaint" in message and "YAML" in message


def test_unconditional_ldm_is_unknown() -> None:
    sd = {
        k: v for k, v in original_state_dict(TINY_LDM_CLASS).items() if not k.startswith("cond_stage_model.")
    }
    _assert_unknown(sd)


def test_checkpoint_without_unet_or_autoencoder_is_unknown() -> None:
    sd = original_state_dict(TINY_LDM_CLASS)
    _assert_unknown({k: v for k, v in sd.items() if k.startswith("first_stage_model.")})
    _assert_unknown({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")})


def test_foreign_text_encoder_is_unknown() -> None:
    sd = original_state_dict(TINY_LDM_CLASS)
    sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    sd["cond_stage_model.embedders.0.transformer.weight"] = torch.zeros(4, 4)  # SDXL-like conditioner
    _assert_unknown(sd)


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD1_INPAINT, TINY_SD2], ids=lambda c: c.family)
def test_cross_attending_unet_without_encoder_is_refused(config) -> None:  # noqa: ANN001
    """A text encoder pruned from the file: never LDM inpainting (for 9 channels), always the remedy."""
    sd = {k: v for k, v in original_state_dict(config).items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ConfigError, match="cross-attends") as info:
        infer_model_config(sd)
    assert "text_encoder=PATH" in str(info.value)
