"""Original LDM / Stable Diffusion YAML configs <-> :class:`ldm.config.ModelConfig`.

:func:`model_config_from_yaml` reads the ``model:`` section of the configs that
ship with CompVis/latent-diffusion, CompVis/stable-diffusion, runwayml and
Stability-AI (``v1-inference.yaml``, ``v2-inference-v.yaml``,
``txt2img-1p4B-eval.yaml``, ``cin256-v2.yaml``, the ``inpainting_big`` config,
...). Every option either maps onto a config field, is a training-only option
that inference ignores, or raises :class:`~ldm_serve.errors.ConfigError` naming
it; nothing is silently dropped.

:func:`model_config_to_yaml` writes the same layout back. For the released
architectures the output uses only original parameters. Text encoders whose
sizes differ from the released ones (our own small models) get their sizes as
extra ``params`` keys named after :class:`~ldm.config.CLIPTextConfig` /
:class:`~ldm.config.BERTEmbedderConfig` fields; the original code would reject
those, this parser reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ldm.config import (
    AutoencoderConfig,
    BERTEmbedderConfig,
    ClassEmbedderConfig,
    CLIPTextConfig,
    CondStageConfig,
    ModelConfig,
    UNetConfig,
)
from ldm_serve.errors import ConfigError

__all__ = [
    "CLIP_VIT_L_14",
    "OPENCLIP_VIT_H_14",
    "classify_family",
    "default_unconditional_class",
    "model_config_from_yaml",
    "model_config_to_yaml",
]

# --------------------------------------------------------------------------- targets

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
LATENT_INPAINT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER_KL = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel")
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"
IS_FIRST_STAGE = "__is_first_stage__"
IS_UNCONDITIONAL = "__is_unconditional__"

CLIP_VIT_L_14 = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer="last",
    pad_token="<|endoftext|>",
)
"""SD 1.x ``FrozenCLIPEmbedder`` (``openai/clip-vit-large-patch14`` text tower)."""

OPENCLIP_VIT_H_14 = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer="penultimate",
    pad_token="!",
)
"""SD 2.x ``FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate")`` text tower."""

_CLIP_VERSIONS = {"openai/clip-vit-large-patch14": CLIP_VIT_L_14}
_OPENCLIP_ARCHS = {"ViT-H-14": OPENCLIP_VIT_H_14}
# ldm-serve extension keys accepted in a CLIP cond stage's params (sizes of our own models).
_CLIP_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token",
)

# Options of LatentDiffusion / DDPM that only matter for training or logging.
_TRAINING_ONLY = frozenset(
    {
        "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "cond_stage_trainable",
        "monitor", "loss_type", "scheduler_config", "ckpt_path", "ignore_keys", "load_only_unet",
        "learn_logvar", "logvar_init", "l_simple_weight", "original_elbo_weight", "v_posterior",
        "clip_denoised", "use_positional_encodings", "cond_stage_forward", "finetune_keys",
        "make_it_fit", "reset_ema", "reset_num_ema_updates", "unet_trainable", "concat_keys",
        "masked_image_key", "c_concat_log_start", "c_concat_log_end",
    }
)  # fmt: skip


class _Params:
    """A ``params`` mapping whose keys must all be consumed (or explicitly ignored)."""

    def __init__(self, raw: object, where: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.where = where
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.raw.get(key, default)
        return default if value is None and default is not None else value

    def require(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise ConfigError(f"{self.where}.{key} is required")
        return self.get(key)

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def expect_default(self, key: str, allowed: tuple[Any, ...], why: str) -> None:
        """Accept ``key`` only when absent or one of ``allowed`` (the original default)."""
        value = self.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{self.where}.{key}={value!r} is not supported: {why}")

    def finish(self) -> None:
        left = sorted(set(self.raw) - self.used)
        if left:
            raise ConfigError(f"unsupported option(s) in {self.where}: {', '.join(left)}")


def _int_tuple(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{where} must be a list of integers, got {value!r}")
    return tuple(int(v) for v in value)


def _target(section: object, where: str) -> tuple[str, object]:
    if not isinstance(section, Mapping) or "target" not in section:
        raise ConfigError(f"{where} must be a mapping with a 'target'")
    extra = sorted(set(section) - {"target", "params"})
    if extra:
        raise ConfigError(f"unsupported key(s) in {where}: {', '.join(map(str, extra))}")
    return str(section["target"]), section.get("params")


# --------------------------------------------------------------------------- parsing


def default_unconditional_class(n_classes: int) -> int | None:
    """The "null" label of a class-conditional LDM when its config does not name one.

    cin256-v2 adds a 1001st class (id 1000) for classifier-free guidance, i.e. the
    last id. A 1000-class ImageNet model has no null class. We assume the same
    convention for any other count: the last id is the null class.
    """
    return None if n_classes == 1000 else n_classes - 1


def _parse_unet(section: object) -> tuple[UNetConfig, int | None]:
    target, raw = _target(section, "unet_config")
    if target != UNET_TARGET:
        raise ConfigError(f"unknown unet_config target {target!r}; expected {UNET_TARGET}")
    p = _Params(raw, "unet_config.params")
    image_size = p.get("image_size")
    p.ignore("dropout", "use_checkpoint", "use_fp16", "spatial_transformer_attn_type")
    p.expect_default("dims", (2,), "only 2-D UNets are supported")
    p.expect_default("n_embed", (None,), "codebook-predicting UNets are not supported")
    p.expect_default(
        "use_new_attention_order", (False,), "only the legacy QKV attention order is implemented"
    )
    p.expect_default(
        "disable_self_attentions", (None,), "per-level self-attention switches are not supported"
    )
    p.expect_default("num_attention_blocks", (None,), "per-level attention block counts are not supported")
    p.expect_default(
        "disable_middle_self_attn", (False,), "a middle block without self-attention is not supported"
    )
    p.expect_default("adm_in_channels", (None,), "ADM vector conditioning is not supported")
    num_classes = p.get("num_classes")
    if num_classes is not None and not isinstance(num_classes, int):
        raise ConfigError(
            f"unet_config.params.num_classes={num_classes!r} is not supported (integer class counts only)"
        )
    context_dim = p.get("context_dim")
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ConfigError(
                f"unet_config.params.context_dim={context_dim!r}: per-level widths are not supported"
            )
        context_dim = int(context_dim[0])
    depth = p.get("transformer_depth", 1)
    if not isinstance(depth, int):
        raise ConfigError(
            f"unet_config.params.transformer_depth={depth!r}: per-level depths are not supported"
        )
    cfg = UNetConfig(
        in_channels=int(p.require("in_channels")),
        out_channels=int(p.require("out_channels")),
        model_channels=int(p.require("model_channels")),
        channel_mult=_int_tuple(p.get("channel_mult", [1, 2, 4, 8]), "unet_config.params.channel_mult"),
        num_res_blocks=int(p.require("num_res_blocks")),
        attention_resolutions=_int_tuple(
            p.require("attention_resolutions"), "unet_config.params.attention_resolutions"
        ),
        num_heads=int(p.get("num_heads", -1)),
        num_head_channels=int(p.get("num_head_channels", -1)),
        num_heads_upsample=int(p.get("num_heads_upsample", -1)),
        legacy=bool(p.get("legacy", True)),
        use_spatial_transformer=bool(p.get("use_spatial_transformer", False)),
        transformer_depth=depth,
        context_dim=None if context_dim is None else int(context_dim),
        use_linear_in_transformer=bool(p.get("use_linear_in_transformer", False)),
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        resblock_updown=bool(p.get("resblock_updown", False)),
        num_classes=num_classes,
        conv_resample=bool(p.get("conv_resample", True)),
    )
    p.finish()
    return cfg, image_size


def _parse_first_stage(section: object) -> AutoencoderConfig:
    target, raw = _target(section, "first_stage_config")
    if target == AUTOENCODER_KL:
        kind = "kl"
    elif target in VQ_TARGETS:
        kind = "vq"
    else:
        raise ConfigError(
            f"unknown first_stage_config target {target!r}; expected {AUTOENCODER_KL} or {' / '.join(VQ_TARGETS)}"
        )
    p = _Params(raw, "first_stage_config.params")
    p.ignore("lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key", "scheduler_config",
             "lr_g_factor", "sane_index_shape", "batch_resize_range", "base_learning_rate")  # fmt: skip
    p.expect_default("colorize_nlabels", (None,), "segmentation-map autoencoders are not supported")
    p.expect_default("remap", (None,), "codebook index remapping is not supported")
    p.expect_default("use_ema", (False,), "autoencoder EMA weights are not supported")
    embed_dim = int(p.require("embed_dim"))
    n_embed = int(p.require("n_embed")) if kind == "vq" else int(p.get("n_embed", 0))
    d = _Params(p.require("ddconfig"), "first_stage_config.params.ddconfig")
    d.ignore("dropout")
    d.expect_default("resamp_with_conv", (True,), "only convolutional resampling is implemented")
    d.expect_default("tanh_out", (False,), "a tanh decoder output is not supported")
    d.expect_default("use_linear_attn", (False,), "linear attention is not supported")
    attn_type = d.get("attn_type", "vanilla")
    if attn_type == "vanilla-xformers":
        attn_type = "vanilla"  # same maths, different kernel
    if attn_type not in ("vanilla", "none"):
        raise ConfigError(f"first_stage_config.params.ddconfig.attn_type={attn_type!r} is not supported")
    cfg = AutoencoderConfig(
        kind=kind,
        embed_dim=embed_dim,
        z_channels=int(d.require("z_channels")),
        resolution=int(d.require("resolution")),
        in_channels=int(d.require("in_channels")),
        out_ch=int(d.require("out_ch")),
        ch=int(d.require("ch")),
        ch_mult=_int_tuple(d.get("ch_mult", [1, 2, 4, 8]), "ddconfig.ch_mult"),
        num_res_blocks=int(d.require("num_res_blocks")),
        attn_resolutions=_int_tuple(d.get("attn_resolutions", []), "ddconfig.attn_resolutions"),
        double_z=bool(d.get("double_z", True)),
        attn_type=attn_type,
        n_embed=n_embed,
        give_pre_end=bool(d.get("give_pre_end", False)),
    )
    d.finish()
    p.finish()
    return cfg


def _clip_overrides(p: _Params, base: CLIPTextConfig) -> CLIPTextConfig:
    changes = {name: p.get(name) for name in _CLIP_SIZE_FIELDS if p.has(name)}
    return dataclasses.replace(base, **changes) if changes else base


def _check_max_length(p: _Params, cfg: CLIPTextConfig, where: str) -> None:
    max_length = p.get("max_length", 77)
    if max_length != cfg.max_position_embeddings:
        raise ConfigError(
            f"{where}.max_length={max_length} differs from the encoder's {cfg.max_position_embeddings} positions"
        )


def _parse_cond_stage(section: object) -> CondStageConfig | str:
    if isinstance(section, str):
        if section in (IS_FIRST_STAGE, IS_UNCONDITIONAL):
            return section
        raise ConfigError(f"unknown cond_stage_config {section!r}")
    target, raw = _target(section, "cond_stage_config")
    p = _Params(raw, "cond_stage_config.params")
    p.ignore("device", "freeze")
    cfg: CondStageConfig
    if target == CLIP_TARGET:
        version = p.get("version", "openai/clip-vit-large-patch14")
        if version not in _CLIP_VERSIONS and not p.has("hidden_size"):
            raise ConfigError(
                f"cond_stage_config.params.version={version!r} is not a known CLIP text tower "
                f"(known: {', '.join(_CLIP_VERSIONS)})"
            )
        layer = p.get("layer", "last")
        if layer not in ("last", "penultimate"):
            raise ConfigError(
                f"cond_stage_config.params.layer={layer!r} is not supported (FrozenCLIPEmbedder: 'last'; "
                "'penultimate' = second-to-last layer + final layer norm)"
            )
        p.ignore("layer_idx")
        cfg = dataclasses.replace(_clip_overrides(p, _CLIP_VERSIONS.get(version, CLIP_VIT_L_14)), layer=layer)
        _check_max_length(p, cfg, "cond_stage_config.params")
    elif target == OPENCLIP_TARGET:
        arch = p.get("arch", "ViT-H-14")
        if arch not in _OPENCLIP_ARCHS and not p.has("hidden_size"):
            raise ConfigError(
                f"cond_stage_config.params.arch={arch!r} is not a known OpenCLIP text tower "
                f"(known: {', '.join(_OPENCLIP_ARCHS)})"
            )
        p.ignore("version")
        layer = p.get("layer", "penultimate")  # every released SD 2.x config says "penultimate"
        if layer not in ("last", "penultimate"):
            raise ConfigError(
                f"cond_stage_config.params.layer={layer!r} is not supported ('last' or 'penultimate')"
            )
        cfg = dataclasses.replace(
            _clip_overrides(p, _OPENCLIP_ARCHS.get(arch, OPENCLIP_VIT_H_14)), layer=layer
        )
        _check_max_length(p, cfg, "cond_stage_config.params")
    elif target == BERT_TARGET:
        defaults = BERTEmbedderConfig()
        cfg = BERTEmbedderConfig(
            n_embed=int(p.require("n_embed")),
            n_layer=int(p.require("n_layer")),
            vocab_size=int(p.get("vocab_size", 30522)),
            max_seq_len=int(p.get("max_seq_len", 77)),
            heads=int(p.get("heads", defaults.heads)),
            dim_head=int(p.get("dim_head", defaults.dim_head)),
            use_tokenizer=bool(p.get("use_tokenizer", True)),
        )
        p.expect_default("embedding_dropout", (0.0, 0), "dropout has no meaning at inference")
    elif target == CLASS_TARGET:
        n_classes = int(p.get("n_classes", 1000))
        null_class = p.get(
            "unconditional_class", default_unconditional_class(n_classes)
        )  # ldm-serve extension
        cfg = ClassEmbedderConfig(
            n_classes=n_classes,
            embed_dim=int(p.require("embed_dim")),
            key=str(p.get("key", "class")),
            unconditional_class=None if null_class is None else int(null_class),
        )
        p.expect_default("ucg_rate", (0.0, 0), "label dropout has no meaning at inference")
    else:
        raise ConfigError(
            f"unknown cond_stage_config target {target!r}; supported: {CLIP_TARGET}, {OPENCLIP_TARGET}, "
            f"{BERT_TARGET}, {CLASS_TARGET}, {IS_FIRST_STAGE}, {IS_UNCONDITIONAL}"
        )
    p.finish()
    return cfg


def classify_family(
    unet: UNetConfig,
    cond_stage: CondStageConfig | None,
    conditioning_key: str,
    inpaint_mode: str | None,
) -> str:
    """Family name of a configuration.

    ``sd1`` / ``sd1-inpaint`` (OpenAI CLIP text encoder), ``sd2`` / ``sd2-inpaint``
    (OpenCLIP, recognised by its exact GELU), ``ldm-txt2img`` (BERTEmbedder),
    ``ldm-class`` (ClassEmbedder), ``ldm-inpaint`` (``__is_first_stage__`` concat),
    ``ldm-uncond`` (unconditional).
    """
    if isinstance(cond_stage, CLIPTextConfig):
        base = "sd2" if cond_stage.hidden_act == "gelu" else "sd1"
        return f"{base}-inpaint" if inpaint_mode == "sd" else base
    if isinstance(cond_stage, BERTEmbedderConfig):
        return "ldm-txt2img"
    if isinstance(cond_stage, ClassEmbedderConfig):
        return "ldm-class"
    if inpaint_mode == "ldm":
        return "ldm-inpaint"
    if conditioning_key == "none":
        return "ldm-uncond"
    raise ConfigError(f"no known model family has conditioning {conditioning_key!r} without a cond stage")


def _load_mapping(src: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(src, Mapping):
        return src
    path = Path(src)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} does not hold a YAML mapping")
    return data


def model_config_from_yaml(src: str | Path | Mapping[str, Any]) -> ModelConfig:
    """Parse an original LDM / SD inference YAML (path or already-loaded mapping).

    Accepts the whole file (``model:`` plus e.g. ``lightning:`` / ``data:``, which are
    ignored) or just its ``model`` section.

    Raises:
        ConfigError: unreadable YAML, an unknown ``target``, an unknown or unsupported
            option (the message names it), or inconsistent channel counts.
    """
    data = _load_mapping(src)
    model = data["model"] if "model" in data else data
    if not isinstance(model, Mapping):
        raise ConfigError("config 'model' section must be a mapping")
    extra = sorted(set(model) - {"target", "params", "base_learning_rate"})
    if extra:
        raise ConfigError(f"unsupported key(s) in model: {', '.join(map(str, extra))}")
    target = model.get("target")
    if target not in (LATENT_DIFFUSION, LATENT_INPAINT_DIFFUSION):
        raise ConfigError(
            f"unknown model target {target!r}; supported: {LATENT_DIFFUSION}, {LATENT_INPAINT_DIFFUSION}"
        )
    p = _Params(model.get("params"), "model.params")
    p.ignore(*_TRAINING_ONLY)
    p.expect_default("given_betas", (None,), "explicit beta tables are not supported")
    p.expect_default("cosine_s", (8e-3,), "only the default cosine offset is supported")

    unet, unet_image_size = _parse_unet(p.require("unet_config"))
    first_stage = _parse_first_stage(p.require("first_stage_config"))
    cond = _parse_cond_stage(p.require("cond_stage_config"))

    parameterization = p.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise ConfigError(
            f"model.params.parameterization={parameterization!r} is not supported ('eps' or 'v')"
        )
    conditioning_key = p.get("conditioning_key")
    concat_mode = bool(p.get("concat_mode", True))
    if conditioning_key is None:
        conditioning_key = "concat" if concat_mode else "crossattn"
    if cond == IS_UNCONDITIONAL:
        conditioning_key = "none"
    if conditioning_key not in ("none", "crossattn", "concat", "hybrid"):
        raise ConfigError(f"model.params.conditioning_key={conditioning_key!r} is not supported")

    inpaint_mode: str | None = None
    cond_stage: CondStageConfig | None = None
    if target == LATENT_INPAINT_DIFFUSION:
        if conditioning_key != "hybrid":
            raise ConfigError(
                f"{LATENT_INPAINT_DIFFUSION} needs conditioning_key 'hybrid', got {conditioning_key!r}"
            )
        inpaint_mode = "sd"
    elif conditioning_key == "hybrid":
        raise ConfigError(f"conditioning_key 'hybrid' is only supported with {LATENT_INPAINT_DIFFUSION}")
    if cond == IS_FIRST_STAGE:
        if conditioning_key != "concat" or inpaint_mode is not None:
            raise ConfigError(
                f"cond_stage_config {IS_FIRST_STAGE} is only supported with concat conditioning"
            )
        inpaint_mode = "ldm"
    elif isinstance(cond, str):
        cond_stage = None
    else:
        cond_stage = cond
        if conditioning_key == "concat":
            raise ConfigError("concat conditioning with a text / class encoder is not supported")

    latent_channels = int(p.get("channels", first_stage.embed_dim))
    if latent_channels != first_stage.embed_dim:
        raise ConfigError(
            f"model.params.channels={latent_channels} differs from first stage embed_dim={first_stage.embed_dim}"
        )
    expected_in = 2 * latent_channels + 1 if inpaint_mode else latent_channels
    if unet.in_channels != expected_in:
        raise ConfigError(
            f"unet in_channels={unet.in_channels}, expected {expected_in} for "
            f"{'inpainting (latent + masked latent + mask)' if inpaint_mode else 'latent input'}"
        )
    if unet.out_channels != latent_channels:
        raise ConfigError(
            f"unet out_channels={unet.out_channels} differs from the latent channels {latent_channels}"
        )
    if isinstance(cond_stage, ClassEmbedderConfig) and cond_stage.embed_dim != unet.context_dim:
        raise ConfigError(
            f"ClassEmbedder embed_dim={cond_stage.embed_dim} differs from unet context_dim={unet.context_dim}"
        )

    image_size = p.get("image_size")
    config = ModelConfig(
        family=classify_family(unet, cond_stage, conditioning_key, inpaint_mode),
        unet=unet,
        first_stage=first_stage,
        cond_stage=cond_stage,
        conditioning_key=conditioning_key,
        parameterization=parameterization,
        linear_start=float(p.get("linear_start", 1e-4)),
        linear_end=float(p.get("linear_end", 2e-2)),
        timesteps=int(p.get("timesteps", 1000)),
        beta_schedule=str(p.get("beta_schedule", "linear")),
        scale_factor=float(p.get("scale_factor", 1.0)),
        scale_by_std=bool(p.get("scale_by_std", False)),
        use_ema=bool(p.get("use_ema", True)),
        inpaint_mode=inpaint_mode,  # type: ignore[arg-type]
        latent_channels=latent_channels,
        image_size=int(image_size if image_size is not None else unet_image_size or 64),
    )
    p.finish()
    return config


# --------------------------------------------------------------------------- writing


def _unet_params(u: UNetConfig, image_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        "image_size": image_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "num_heads": u.num_heads,
    }
    if u.num_head_channels != -1:
        params["num_head_channels"] = u.num_head_channels
    if u.num_heads_upsample != -1:
        params["num_heads_upsample"] = u.num_heads_upsample
    if u.use_spatial_transformer:
        params.update(
            use_spatial_transformer=True, transformer_depth=u.transformer_depth, context_dim=u.context_dim
        )
    if u.use_linear_in_transformer:
        params["use_linear_in_transformer"] = True
    if u.use_scale_shift_norm:
        params["use_scale_shift_norm"] = True
    if u.resblock_updown:
        params["resblock_updown"] = True
    if u.num_classes is not None:
        params["num_classes"] = u.num_classes
    if not u.conv_resample:
        params["conv_resample"] = False
    params["legacy"] = u.legacy
    return params


def _first_stage_section(a: AutoencoderConfig) -> dict[str, Any]:
    ddconfig: dict[str, Any] = {
        "double_z": a.double_z,
        "z_channels": a.z_channels,
        "resolution": a.resolution,
        "in_channels": a.in_channels,
        "out_ch": a.out_ch,
        "ch": a.ch,
        "ch_mult": list(a.ch_mult),
        "num_res_blocks": a.num_res_blocks,
        "attn_resolutions": list(a.attn_resolutions),
        "dropout": 0.0,
    }
    if a.attn_type != "vanilla":
        ddconfig["attn_type"] = a.attn_type
    if a.give_pre_end:
        ddconfig["give_pre_end"] = True
    params: dict[str, Any] = {"embed_dim": a.embed_dim}
    if a.kind == "vq":
        params["n_embed"] = a.n_embed
    params["ddconfig"] = ddconfig
    params["lossconfig"] = {"target": "torch.nn.Identity"}
    return {"target": AUTOENCODER_KL if a.kind == "kl" else VQ_TARGETS[0], "params": params}


def _cond_stage_section(c: CondStageConfig | None, inpaint_mode: str | None) -> Any:
    if c is None:
        return IS_FIRST_STAGE if inpaint_mode == "ldm" else IS_UNCONDITIONAL
    if isinstance(c, CLIPTextConfig):
        openclip = c.hidden_act == "gelu"
        base = OPENCLIP_VIT_H_14 if openclip else CLIP_VIT_L_14
        params: dict[str, Any] = (
            {"arch": "ViT-H-14", "version": "laion2b_s32b_b79k", "freeze": True, "layer": c.layer}
            if openclip
            else {"version": "openai/clip-vit-large-patch14"}
        )
        if not openclip and c.layer != "last":
            params["layer"] = c.layer
        for name in _CLIP_SIZE_FIELDS:
            if getattr(c, name) != getattr(base, name):
                params[name] = getattr(c, name)
        return {"target": OPENCLIP_TARGET if openclip else CLIP_TARGET, "params": params}
    if isinstance(c, BERTEmbedderConfig):
        params = {"n_embed": c.n_embed, "n_layer": c.n_layer}
        defaults = BERTEmbedderConfig()
        if c.vocab_size != 30522:
            params["vocab_size"] = c.vocab_size
        if c.max_seq_len != 77:
            params["max_seq_len"] = c.max_seq_len
        if not c.use_tokenizer:
            params["use_tokenizer"] = False
        if (c.heads, c.dim_head) != (defaults.heads, defaults.dim_head):
            params.update(heads=c.heads, dim_head=c.dim_head)
        return {"target": BERT_TARGET, "params": params}
    if isinstance(c, ClassEmbedderConfig):
        params = {"embed_dim": c.embed_dim, "n_classes": c.n_classes, "key": c.key}
        if c.unconditional_class != default_unconditional_class(c.n_classes):
            params["unconditional_class"] = c.unconditional_class
        return {"target": CLASS_TARGET, "params": params}
    raise ConfigError(f"cannot write a cond stage of type {type(c).__name__}")


def model_config_to_yaml(config: ModelConfig) -> str:
    """Write ``config`` as an original-style inference YAML.

    ``model_config_from_yaml(model_config_to_yaml(c)) == c`` for every config this
    module can parse (``extra`` is not written).
    """
    params: dict[str, Any] = {
        "linear_start": config.linear_start,
        "linear_end": config.linear_end,
        "timesteps": config.timesteps,
        "beta_schedule": config.beta_schedule,
        "parameterization": config.parameterization,
        "image_size": config.image_size,
        "channels": config.latent_channels,
        "scale_factor": config.scale_factor,
        "scale_by_std": config.scale_by_std,
        "use_ema": config.use_ema,
    }
    if config.conditioning_key != "none":
        params["conditioning_key"] = config.conditioning_key
    params["unet_config"] = {"target": UNET_TARGET, "params": _unet_params(config.unet, config.image_size)}
    params["first_stage_config"] = _first_stage_section(config.first_stage)
    params["cond_stage_config"] = _cond_stage_section(config.cond_stage, config.inpaint_mode)
    target = LATENT_INPAINT_DIFFUSION if config.inpaint_mode == "sd" else LATENT_DIFFUSION
    return yaml.safe_dump({"model": {"target": target, "params": params}}, sort_keys=False)
