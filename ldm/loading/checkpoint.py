"""Read original LDM / SD checkpoints safely and split them into components.

Three jobs, in the order the loader needs them:

1. :func:`read_state_dict` turns a ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` or
   ``.safetensors`` file into a flat ``{key: tensor}`` dict. Pickle files are read
   with ``torch.load(weights_only=True)`` only. Lightning checkpoints also carry
   numpy scalars and a pickled ``ModelCheckpoint`` callback; those are admitted
   through an explicit allow-list (numpy scalar reconstruction, plus inert
   placeholder classes standing in for a few Lightning callback names). Anything
   else that would need unrestricted unpickling is refused with
   :class:`~ldm_serve.errors.CheckpointError`, without running it.
2. :func:`split_components` strips the ``model.diffusion_model.`` /
   ``first_stage_model.`` / ``cond_stage_model.`` prefixes, picks the EMA or the
   raw UNet weights and sets the root buffers (``alphas_cumprod``, ``scale_factor``,
   ...) aside.
3. :func:`load_component_strict` compares key sets and shapes with a module
   before loading anything, so a checkpoint of another architecture fails with a
   list of what does not fit instead of loading half its weights.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.encoders.clip import CLIP_IGNORED_KEYS
from ldm.encoders.openclip_keys import OPENCLIP_DROPPED_KEYS
from ldm_serve.errors import CheckpointError

__all__ = [
    "DEFAULT_IGNORED_KEYS",
    "LIGHTNING_PLACEHOLDER_NAMES",
    "PICKLE_SUFFIXES",
    "ROOT_BUFFERS",
    "CheckpointComponents",
    "LightningPlaceholder",
    "ema_key",
    "load_component_strict",
    "read_state_dict",
    "redot_unet_key",
    "split_components",
]

PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin")
"""File suffixes read with the restricted ``torch.load``."""

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."

ROOT_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "scale_factor",
    "logvar",
    "lvlb_weights",
    "global_step",
)
"""Root-level tensors of ``ddpm.LatentDiffusion`` (``register_schedule`` & co.), not module weights."""

_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

DEFAULT_IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "unet": (),
    # training-only discriminator / LPIPS / logvar of the autoencoder loss
    "first_stage": ("loss.*",),
    # CLIP position ids are regenerated (some merged files hold garbled float copies);
    # OpenCLIP's projection / temperature / mask are unused for conditioning.
    "cond_stage": (*CLIP_IGNORED_KEYS, *OPENCLIP_DROPPED_KEYS),
}
"""Glob patterns (per component) that :func:`load_component_strict` may skip on either side."""

# --------------------------------------------------------------------------- reading

LIGHTNING_PLACEHOLDER_NAMES: tuple[str, ...] = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.early_stopping.EarlyStopping",
)
"""Lightning classes that may appear in a checkpoint's ``callbacks`` entry.

They are never imported: each name resolves to an inert :class:`LightningPlaceholder`
subclass that only stores the pickled state.
"""


class LightningPlaceholder:
    """Inert stand-in for a pickled Lightning callback: keeps its state, runs nothing."""

    original_name: str = ""

    def __new__(cls, *args: object, **kwargs: object) -> LightningPlaceholder:
        return object.__new__(cls)

    def __setstate__(self, state: object) -> None:
        self.__dict__["pickled_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.original_name}>"


def _placeholder_class(full_name: str) -> type[LightningPlaceholder]:
    short = full_name.rsplit(".", 1)[-1]
    return type(f"{short}Placeholder", (LightningPlaceholder,), {"original_name": full_name})


_PLACEHOLDERS: list[tuple[type, str]] = [(_placeholder_class(n), n) for n in LIGHTNING_PLACEHOLDER_NAMES]

# Numeric numpy dtypes whose scalars may be rebuilt (``global_step``, ``best_model_score``).
_NUMPY_DTYPE_CLASSES: tuple[type, ...] = tuple(
    type(np.dtype(t))
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "float32", "float64")
)  # fmt: skip


def _numpy_safe_globals() -> list[Any]:
    # numpy 2 moved it to numpy._core; numpy 1.26 has a numpy._core without multiarray
    core = getattr(np, "_core", None)
    scalar = core.multiarray.scalar if hasattr(core, "multiarray") else np.core.multiarray.scalar
    return [
        (scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),  # pickled by numpy 2.x
        np.dtype,
        *_NUMPY_DTYPE_CLASSES,
    ]


_ALLOW_LIST_LOCK = threading.Lock()


def _torch_load_restricted(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the numpy / Lightning-placeholder allow-list."""
    allowed = [*_numpy_safe_globals(), *_PLACEHOLDERS]
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        # torch keeps the allow-list in one process-wide set; serialise our loads around it
        with _ALLOW_LIST_LOCK, torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = f"it references {found.group(1)}" if found else str(exc).strip().splitlines()[-1]
        raise CheckpointError(
            f"{path} needs unrestricted unpickling to load ({detail}). Pickled checkpoints can run "
            "arbitrary code, so only tensors, plain containers, numpy scalars and a few Lightning "
            "callback records are accepted. If you trust the file, convert it to .safetensors "
            "in a sandbox and load that instead."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def _flatten(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap nested ``state_dict`` entries; keep tensors and ``global_step``, drop other metadata."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    global_step = _as_int(raw.get("global_step"))
    while isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
        global_step = _as_int(raw.get("global_step")) if "global_step" in raw else global_step
    sd = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path} contains no tensors")
    if global_step is not None:
        sd["global_step"] = torch.tensor(global_step, dtype=torch.int64)
    return sd


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict on the CPU.

    ``.ckpt``, ``.pt``, ``.pth`` and ``.bin`` go through ``torch.load(weights_only=True)``
    (memory-mapped when possible); ``.safetensors`` through safetensors. A nested
    ``state_dict`` (Lightning) is unwrapped. Non-tensor metadata is dropped, except
    ``global_step``, which is kept as a 0-d int64 tensor under that key.

    Raises:
        CheckpointError: the file is absent, unreadable, of an unknown type, holds no
            tensors, or needs unrestricted unpickling (e.g. it pickles a function call).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        raw: object = _read_safetensors(p)
    elif suffix in PICKLE_SUFFIXES:
        raw = _torch_load_restricted(p)
    else:
        raise CheckpointError(
            f"unsupported checkpoint type {suffix!r} for {p}; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    return _flatten(raw, p)


# --------------------------------------------------------------------------- EMA keys


def ema_key(unet_key: str) -> str:
    """The ``LitEma`` key of a UNet weight: ``input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


# Names that occur between the dots of UNet keys (openaimodel / attention modules).
_UNET_KEY_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            "time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out",
            "in_layers", "emb_layers", "out_layers", "skip_connection", "op", "conv",
            "norm", "qkv", "proj_in", "proj_out", "transformer_blocks", "attn1", "attn2",
            "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "norm1", "norm2", "norm3",
            "weight", "bias",
        },
        key=len,
        reverse=True,
    )
)  # fmt: skip


def redot_unet_key(dotless: str) -> str | None:
    """Best-effort inverse of ``LitEma``'s dot stripping for UNet keys, without a key list.

    ``diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight`` ->
    ``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``. Names are matched
    longest first from the UNet's vocabulary; a digit run after ``input_blocks`` /
    ``output_blocks`` is a block index followed by a one-digit sub-module index.
    Used only to infer a config from an EMA-only checkpoint; loading maps EMA keys
    against the model's own key list (:func:`split_components`). Returns ``None``
    when the name does not parse.
    """
    s = dotless[len("diffusion_model") :] if dotless.startswith("diffusion_model") else None
    if not s:
        return None
    tokens: list[str] = []
    pos = 0
    while pos < len(s):
        if s[pos].isdigit():
            end = pos
            while end < len(s) and s[end].isdigit():
                end += 1
            run = s[pos:end]
            if tokens and tokens[-1] in ("input_blocks", "output_blocks"):
                if len(run) < 2:
                    return None
                tokens += [str(int(run[:-1])), run[-1]]
            else:
                tokens.append(str(int(run)))
            pos = end
            continue
        word = next((w for w in _UNET_KEY_WORDS if s.startswith(w, pos)), None)
        if word is None:
            return None
        tokens.append(word)
        pos += len(word)
    if tokens[-1] not in ("weight", "bias"):
        return None
    return ".".join(tokens)


# --------------------------------------------------------------------------- splitting


@dataclass
class CheckpointComponents:
    """A checkpoint split by component, prefixes stripped.

    Attributes:
        unet: the selected UNet weights (EMA or raw, see ``used_ema``), keys as in
            :class:`ldm.unet.UNetModel`.
        first_stage: ``first_stage_model.*`` without the prefix.
        cond_stage: ``cond_stage_model.*`` without the prefix (still ``transformer.`` /
            ``model.`` for CLIP / OpenCLIP; see :func:`ldm.loading.loader.cond_stage_state_dict`).
        ema_unet: the EMA UNet weights mapped back to dotted keys, or ``None`` when the
            checkpoint holds no ``model_ema.*`` weights.
        buffers: root tensors (``betas``, ``alphas_cumprod``, ..., ``scale_factor``).
        global_step: the training step, when recorded.
        used_ema: whether ``unet`` holds the EMA weights.
        unexpected: keys under no known prefix (another architecture's modules, e.g. SDXL's
            ``conditioner.*``), and EMA entries that match no UNet weight.
    """

    unet: dict[str, torch.Tensor]
    first_stage: dict[str, torch.Tensor]
    cond_stage: dict[str, torch.Tensor]
    ema_unet: dict[str, torch.Tensor] | None = None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    global_step: int | None = None
    used_ema: bool = False
    unexpected: list[str] = field(default_factory=list)


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def split_components(
    sd: Mapping[str, torch.Tensor],
    use_ema: bool | None = None,
    *,
    unet_keys: Iterable[str] | None = None,
) -> CheckpointComponents:
    """Split an original-layout state dict into its components.

    EMA weights (``model_ema.<key without dots>``) are mapped back to UNet keys by
    matching against a reference key list: ``unet_keys`` (the model's own
    ``state_dict()`` keys, preferred), else the checkpoint's raw
    ``model.diffusion_model.*`` keys, else :func:`redot_unet_key`.
    ``model_ema.decay`` / ``num_updates`` are ignored.

    Args:
        sd: flat checkpoint dict (from :func:`read_state_dict`).
        use_ema: ``True``: use the EMA weights (error if absent); ``False``: use the
            raw weights (error if absent); ``None``: EMA when present, else raw.
        unet_keys: UNet key names (without ``model.diffusion_model.``) to map EMA keys onto.

    Raises:
        CheckpointError: the requested weights are absent.
    """
    unet = _strip(sd, UNET_PREFIX)
    first_stage = _strip(sd, FIRST_STAGE_PREFIX)
    cond_stage = _strip(sd, COND_STAGE_PREFIX)
    buffers = {k: v for k, v in sd.items() if k in ROOT_BUFFERS}
    global_step = _as_int(buffers.pop("global_step", None))
    ema_raw = {k: v for k, v in sd.items() if k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING}
    known = (UNET_PREFIX, FIRST_STAGE_PREFIX, COND_STAGE_PREFIX, EMA_PREFIX)
    unexpected = sorted(k for k in sd if not k.startswith(known) and k not in ROOT_BUFFERS)

    ema_unet: dict[str, torch.Tensor] | None = None
    if ema_raw:
        reference = list(unet_keys) if unet_keys is not None else list(unet)
        ema_unet = {}
        if reference:
            by_ema_key: dict[str, str] = {}
            for key in reference:
                dotless = ema_key(key)
                if dotless in by_ema_key:
                    raise CheckpointError(f"UNet keys {by_ema_key[dotless]} and {key} have the same EMA name")
                by_ema_key[dotless] = key
            for k, v in ema_raw.items():
                if k in by_ema_key:
                    ema_unet[by_ema_key[k]] = v
                else:
                    unexpected.append(k)
        else:
            for k, v in ema_raw.items():
                dotted = redot_unet_key(k[len(EMA_PREFIX) :])
                if dotted is None:
                    unexpected.append(k)
                else:
                    ema_unet[dotted] = v

    if use_ema is True and not ema_unet:
        raise CheckpointError("use_ema=True but the checkpoint holds no EMA (model_ema.*) weights")
    if use_ema is False and not unet:
        hint = " (it holds only EMA weights; load with use_ema=True or None)" if ema_unet else ""
        raise CheckpointError(
            f"use_ema=False but the checkpoint holds no model.diffusion_model.* weights{hint}"
        )
    take_ema = bool(ema_unet) and use_ema is not False
    if not take_ema and not unet:
        raise CheckpointError("the checkpoint holds no UNet weights (model.diffusion_model.* or model_ema.*)")
    return CheckpointComponents(
        unet=ema_unet if take_ema and ema_unet is not None else unet,
        first_stage=first_stage,
        cond_stage=cond_stage,
        ema_unet=ema_unet or None,
        buffers=buffers,
        global_step=global_step,
        used_ema=take_ema,
        unexpected=sorted(unexpected),
    )


# --------------------------------------------------------------------------- strict loading


def load_component_strict(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    component: str,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Load ``sd`` into ``module`` only if every tensor fits; cast to the module's dtypes.

    Key sets and shapes are compared before anything is copied. Keys matching an
    ``ignore`` glob pattern are skipped on both sides (a checkpoint may hold them or
    not; the module keeps its own value).

    Args:
        module: the freshly built component.
        sd: its weights, prefix already stripped.
        component: a name for messages (``"unet"``, ``"first_stage"``, ``"cond_stage"``).
        ignore: glob patterns of keys that may be absent or extra
            (see :data:`DEFAULT_IGNORED_KEYS`).

    Returns:
        ``module``, loaded.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped tensors.
    """
    patterns = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in sd and not ignored(k))
    unexpected = sorted(k for k in sd if k not in expected and not ignored(k))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{component} weights do not match the configured architecture",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    to_load = {
        k: v.to(dtype=expected[k].dtype) if v.dtype != expected[k].dtype else v
        for k, v in sd.items()
        if k in expected and not ignored(k)
    }
    module.load_state_dict(to_load, strict=False)
    return module
