"""Original LDM / SD YAML configs -> ModelConfig, and back.

The YAML texts below reproduce the released files' structure and values
(reference notes §1.2-1.5): CompVis ``v1-inference.yaml``, runwayml
``v1-inpainting-inference.yaml``, Stability-AI ``v2-inference-v.yaml``, LD
``txt2img-1p4B-eval.yaml``, the ``inpainting_big`` config and ``cin256-v2.yaml``,
including their training-only options.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm.config import BERTEmbedderConfig, ClassEmbedderConfig, CLIPTextConfig
from ldm.loading.config_yaml import model_config_from_yaml, model_config_to_yaml
from ldm.unet import attention_geometry, validate_unet_config
from ldm_serve.errors import ConfigError
from tests.checkpoints import ALL_TINY

KL_F8 = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

SD_LR = """
    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ]
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]
"""

V1_INFERENCE = f"""
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
{SD_LR}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
{KL_F8}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

V1_INPAINTING = (
    V1_INFERENCE.replace(
        "ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    )
    .replace("conditioning_key: crossattn", "conditioning_key: hybrid   # important")
    .replace(
        "in_channels: 4\n        out_channels: 4",
        "in_channels: 9  # 4 data + 4 downscaled image + 1 mask\n        out_channels: 4",
    )
    .replace("    use_ema: False\n", "    finetune_keys: null\n")
)

KL_F8_XFORMERS = KL_F8.replace("double_z: true", "attn_type: vanilla-xformers\n          double_z: true")

V2_INFERENCE_V = f"""
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
{KL_F8_XFORMERS}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

TXT2IMG_1P4B = f"""
model:
  base_learning_rate: 5.0e-05
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: caption
    image_size: 32
    channels: 4
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions:
        - 4
        - 2
        - 1
        num_res_blocks: 2
        channel_mult:
        - 1
        - 2
        - 4
        - 4
        num_heads: 8
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 1280
        use_checkpoint: true
        legacy: False
{KL_F8}
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 1280
        n_layer: 32
"""

VQ_F4 = """
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        monitor: val/rec_loss
        ddconfig:
          {attn}double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: {loss}
"""

VQ_F4_NOATTN = VQ_F4.format(
    attn="attn_type: none\n          ", loss="ldm.modules.losses.contperceptual.DummyLoss"
)
VQ_F4_PLAIN = VQ_F4.format(attn="", loss="torch.nn.Identity")

LDM_INPAINTING_BIG = f"""
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    log_every_t: 100
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: masked_image
    image_size: 64
    channels: 3
    concat_mode: true
    monitor: val/loss
    scheduler_config:
      target: ldm.lr_scheduler.LambdaWarmUpCosineScheduler
      params:
        verbosity_interval: 0
        warm_up_steps: 1000
        max_decay_steps: 50000
        lr_start: 0.001
        lr_max: 0.1
        lr_min: 0.0001
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 7
        out_channels: 3
        model_channels: 256
        attention_resolutions:
        - 8
        - 4
        - 2
        num_res_blocks: 2
        channel_mult:
        - 1
        - 2
        - 3
        - 4
        num_heads: 8
        resblock_updown: true
{VQ_F4_NOATTN}
    cond_stage_config: __is_first_stage__
"""

CIN256_V2 = f"""
model:
  base_learning_rate: 0.0001
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: class_label
    image_size: 64
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 192
        attention_resolutions:
        - 8
        - 4
        - 2
        num_res_blocks: 2
        channel_mult:
        - 1
        - 2
        - 3
        - 5
        num_heads: 1
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 512
{VQ_F4_PLAIN}
    cond_stage_config:
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        n_classes: 1001
        embed_dim: 512
        key: class_label
"""

RELEASED = {
    "v1-inference": V1_INFERENCE,
    "v1-inpainting-inference": V1_INPAINTING,
    "v2-inference-v": V2_INFERENCE_V,
    "txt2img-1p4B-eval": TXT2IMG_1P4B,
    "inpainting_big": LDM_INPAINTING_BIG,
    "cin256-v2": CIN256_V2,
}


def parse(text: str):
    return model_config_from_yaml(yaml.safe_load(text))


def test_v1_inference() -> None:
    c = parse(V1_INFERENCE)
    assert c.family == "sd1"
    assert (c.conditioning_key, c.parameterization, c.inpaint_mode) == ("crossattn", "eps", None)
    assert (c.linear_start, c.linear_end, c.timesteps, c.beta_schedule) == (0.00085, 0.012, 1000, "linear")
    assert (c.scale_factor, c.scale_by_std, c.use_ema, c.latent_channels, c.image_size) == (
        0.18215,
        False,
        False,
        4,
        64,
    )
    u = c.unet
    assert (u.in_channels, u.out_channels, u.model_channels, u.channel_mult) == (4, 4, 320, (1, 2, 4, 4))
    assert (u.attention_resolutions, u.num_res_blocks, u.context_dim, u.legacy) == ((4, 2, 1), 2, 768, False)
    assert u.use_spatial_transformer and not u.use_linear_in_transformer
    validate_unet_config(u)
    # SD 1.x: 8 heads at every level, head width 40 / 80 / 160
    assert [attention_geometry(u, 320 * m).dim_head for m in (1, 2, 4)] == [40, 80, 160]
    a = c.first_stage
    assert (a.kind, a.embed_dim, a.z_channels, a.ch, a.ch_mult, a.double_z, a.attn_type) == (
        "kl",
        4,
        4,
        128,
        (1, 2, 4, 4),
        True,
        "vanilla",
    )
    t = c.cond_stage
    assert isinstance(t, CLIPTextConfig)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (t.vocab_size, t.hidden_act, t.layer, t.pad_token) == (
        49408,
        "quick_gelu",
        "last",
        "<|endoftext|>",
    )


def test_v1_inpainting() -> None:
    c = parse(V1_INPAINTING)
    assert c.family == "sd1-inpaint"
    assert (c.conditioning_key, c.inpaint_mode, c.unet.in_channels) == ("hybrid", "sd", 9)
    assert c.use_ema is True  # not set in the file: LatentDiffusion's default


def test_v2_inference_v() -> None:
    c = parse(V2_INFERENCE_V)
    assert (c.family, c.parameterization) == ("sd2", "v")
    u = c.unet
    assert (u.num_head_channels, u.num_heads, u.use_linear_in_transformer, u.context_dim) == (
        64,
        -1,
        True,
        1024,
    )
    assert [attention_geometry(u, 320 * m).heads for m in (1, 2, 4)] == [5, 10, 20]
    assert c.first_stage.attn_type == "vanilla"  # vanilla-xformers is the same maths
    t = c.cond_stage
    assert isinstance(t, CLIPTextConfig)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert (t.hidden_act, t.layer, t.pad_token) == ("gelu", "penultimate", "!")


def test_txt2img_1p4b() -> None:
    c = parse(TXT2IMG_1P4B)
    assert (c.family, c.conditioning_key, c.image_size, c.scale_factor) == (
        "ldm-txt2img",
        "crossattn",
        32,
        0.18215,
    )
    assert c.unet.context_dim == 1280
    assert c.cond_stage == BERTEmbedderConfig(n_embed=1280, n_layer=32, vocab_size=30522, max_seq_len=77)


def test_ldm_inpainting_big() -> None:
    c = parse(LDM_INPAINTING_BIG)
    assert (c.family, c.conditioning_key, c.inpaint_mode, c.cond_stage) == (
        "ldm-inpaint",
        "concat",
        "ldm",
        None,
    )
    assert (c.linear_start, c.linear_end, c.scale_factor, c.use_ema, c.latent_channels) == (
        0.0015,
        0.0205,
        1.0,
        True,
        3,
    )
    u = c.unet
    assert (u.in_channels, u.out_channels, u.model_channels, u.channel_mult) == (7, 3, 256, (1, 2, 3, 4))
    assert (u.resblock_updown, u.use_spatial_transformer, u.legacy, u.num_heads) == (True, False, True, 8)
    a = c.first_stage
    assert (a.kind, a.embed_dim, a.n_embed, a.attn_type, a.double_z, a.ch_mult) == (
        "vq",
        3,
        8192,
        "none",
        False,
        (1, 2, 4),
    )


def test_cin256_v2() -> None:
    c = parse(CIN256_V2)
    assert (c.family, c.linear_end, c.scale_factor, c.use_ema) == ("ldm-class", 0.0195, 1.0, False)
    assert c.cond_stage == ClassEmbedderConfig(
        n_classes=1001, embed_dim=512, key="class_label", unconditional_class=1000
    )
    assert (c.unet.num_heads, c.unet.context_dim, c.unet.channel_mult) == (1, 512, (1, 2, 3, 5))
    assert c.first_stage.attn_type == "vanilla"


def test_unconditional_and_concat_defaults() -> None:
    data = yaml.safe_load(CIN256_V2)
    data["model"]["params"]["cond_stage_config"] = "__is_unconditional__"
    unet = data["model"]["params"]["unet_config"]["params"]
    del unet["use_spatial_transformer"], unet["context_dim"]
    c = model_config_from_yaml(data)
    assert (c.family, c.conditioning_key, c.cond_stage) == ("ldm-uncond", "none", None)


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_round_trip_with_original_params_only(name: str) -> None:
    config = parse(RELEASED[name])
    text = model_config_to_yaml(config)
    assert model_config_from_yaml(yaml.safe_load(text)) == config
    cond = yaml.safe_load(text)["model"]["params"]["cond_stage_config"]
    if isinstance(cond, dict):
        extension = {
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "heads",
            "dim_head",
            "pad_token",
            "hidden_act",
        }
        assert not extension & set(cond.get("params", {})), cond


@pytest.mark.parametrize("family", list(ALL_TINY))
def test_tiny_configs_round_trip(family: str, tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(model_config_to_yaml(ALL_TINY[family]), encoding="utf-8")
    assert model_config_from_yaml(path) == ALL_TINY[family]
    assert model_config_from_yaml(str(path)) == ALL_TINY[family]


def _with(text: str, *path_and_value: object) -> dict:
    data = yaml.safe_load(text)
    *keys, last, value = path_and_value
    node = data
    for key in keys:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("model", "target", "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"), "LatentUpscaleDiffusion"),
        (("model", "params", "unet_config", "params", "dims", 3), "dims"),
        (("model", "params", "unet_config", "params", "foo_option", 1), "foo_option"),
        (("model", "params", "mystery_param", 1), "mystery_param"),
        (("model", "params", "unet_config", "target", "sgm.modules.UNetModel"), "sgm.modules.UNetModel"),
        (
            ("model", "params", "first_stage_config", "target", "ldm.models.autoencoder.IdentityFirstStage"),
            "IdentityFirstStage",
        ),
        (
            (
                "model",
                "params",
                "cond_stage_config",
                "target",
                "ldm.modules.encoders.modules.SpatialRescaler",
            ),
            "SpatialRescaler",
        ),
        (("model", "params", "cond_stage_config", "__is_something__"), "__is_something__"),
        (("model", "params", "cond_stage_config", "params", {"layer": "hidden"}), "layer"),
        (("model", "params", "parameterization", "x0"), "parameterization"),
        (("model", "params", "conditioning_key", "hybrid"), "hybrid"),
        (("model", "params", "conditioning_key", "adm"), "conditioning_key"),
        (("model", "params", "channels", 3), "channels"),
        (("model", "params", "unet_config", "params", "in_channels", 9), "in_channels"),
        (
            ("model", "params", "unet_config", "params", "use_new_attention_order", True),
            "use_new_attention_order",
        ),
        (("model", "params", "first_stage_config", "params", "ddconfig", "attn_type", "linear"), "attn_type"),
        (("model", "params", "given_betas", [0.1, 0.2]), "given_betas"),
    ],
)
def test_unknown_or_unsupported_options_are_named(edit: tuple, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        model_config_from_yaml(_with(V1_INFERENCE, *edit))


def test_missing_required_key_is_named() -> None:
    data = yaml.safe_load(V1_INFERENCE)
    del data["model"]["params"]["unet_config"]["params"]["model_channels"]
    with pytest.raises(ConfigError, match="model_channels"):
        model_config_from_yaml(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        model_config_from_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        model_config_from_yaml(bad)


def test_training_only_options_are_ignored() -> None:
    base = parse(V1_INFERENCE)
    data = yaml.safe_load(V1_INFERENCE)
    data["model"]["params"].update(ckpt_path="/somewhere/else.ckpt", ignore_keys=["x"], loss_type="l1")
    data["model"]["params"]["unet_config"]["params"].update(dropout=0.1, use_fp16=True)
    data["lightning"] = {"trainer": {"benchmark": True}}
    assert model_config_from_yaml(data) == base
