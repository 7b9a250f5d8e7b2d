"""A text encoder given apart from the checkpoint.

Shared Stable Diffusion files are often pruned of their text encoder (no
``cond_stage_model.*`` tensors). :func:`load_model(..., text_encoder=PATH)
<ldm.loading.loader.load_model>` (CLI: ``--text-encoder PATH``) takes it from:

* a diffusers ``text_encoder/`` folder: ``config.json`` (``CLIPTextModel``) and
  ``model[.fp16].safetensors`` / ``pytorch_model.bin``; the pad token is read from a
  ``tokenizer/`` folder beside it when there is one (SD 2: ``"!"``);
* a file in the original checkpoint layout holding only ``cond_stage_model.*`` tensors
  (SD 1 ``cond_stage_model.transformer.text_model.*``, SD 2 OpenCLIP ``cond_stage_model.model.*``),
  e.g. the text encoder cut out of the full file;
* a single ``CLIPTextModel`` weights file (``text_model.*`` keys) with its ``config.json``
  beside it.

Strictness is kept for everything given: the checkpoint must not hold text-encoder
weights of its own, the text-encoder file must hold nothing but a text encoder, and the
encoder is then loaded strictly like every other component (missing, unexpected or
mis-shaped tensors raise :class:`~ldm_serve.errors.CheckpointError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.config import CLIPTextConfig
from ldm.loading.checkpoint import COND_STAGE_PREFIX, read_state_dict
from ldm.loading.diffusers_format import (
    pad_token_of,
    read_json,
    text_config_from_transformers,
    text_state_dict_from_transformers,
    weights_file,
)
from ldm_serve.errors import CheckpointError, ConfigError

__all__ = ["SD1_TEXT_PREFIX", "TextEncoderWeights", "attach_text_encoder", "read_text_encoder"]

SD1_TEXT_PREFIX = COND_STAGE_PREFIX + "transformer."
"""Where an SD 1 checkpoint keeps ``CLIPTextModel``'s ``text_model.*`` tensors."""


@dataclass(frozen=True)
class TextEncoderWeights:
    """A separately given text encoder, in the original checkpoint layout.

    Attributes:
        state_dict: ``cond_stage_model.*`` tensors, as a full checkpoint would hold them.
        config: the encoder's configuration when the source states it (a ``config.json``),
            else ``None`` (then it comes from the model's YAML or from the shapes).
        source: the path it was read from.
    """

    state_dict: dict[str, torch.Tensor]
    config: CLIPTextConfig | None
    source: str


def _transformers_config(folder: Path, source: Path) -> CLIPTextConfig:
    config_json = folder / "config.json"
    if not config_json.is_file():
        raise ConfigError(
            f"{source} holds a CLIPTextModel in the transformers layout but {config_json} is missing; "
            "give the whole diffusers text_encoder/ folder (config.json + weights)"
        )
    return text_config_from_transformers(read_json(config_json), pad_token_of(folder.parent / "tokenizer"))


def read_text_encoder(path: str | Path) -> TextEncoderWeights:
    """Read a separately given text encoder (see the module docstring for the accepted forms).

    Raises:
        CheckpointError: unreadable weights, or a file holding anything but a text encoder.
        ConfigError: a transformers-layout encoder without its ``config.json``, or an
            unsupported one.
    """
    path = Path(path)
    if path.is_dir():
        sd = text_state_dict_from_transformers(weights_file(path, ("model", "pytorch_model")))
        return TextEncoderWeights(_prefixed(sd, path), _transformers_config(path, path), str(path))
    if not path.is_file():
        raise CheckpointError(f"text encoder {path} does not exist")
    sd = read_state_dict(path)
    if sd and all(k.startswith(COND_STAGE_PREFIX) for k in sd):
        return TextEncoderWeights(dict(sd), None, str(path))
    hf = text_state_dict_from_transformers(sd)
    if any(k.startswith("text_model.") for k in hf):
        return TextEncoderWeights(_prefixed(hf, path), _transformers_config(path.parent, path), str(path))
    raise CheckpointError(
        f"{path} is not a text encoder: expected only cond_stage_model.* tensors (original layout) "
        "or a CLIPTextModel (text_model.*)",
        unexpected=sorted(k for k in sd if not k.startswith(COND_STAGE_PREFIX)),
    )


def _prefixed(sd: Mapping[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    other = sorted(k for k in sd if not k.startswith("text_model."))
    if other:
        raise CheckpointError(f"{source} holds tensors outside the CLIPTextModel", unexpected=other)
    return {SD1_TEXT_PREFIX + k: v for k, v in sd.items()}


def attach_text_encoder(
    sd: Mapping[str, torch.Tensor], text_encoder: TextEncoderWeights, checkpoint: Path
) -> dict[str, torch.Tensor]:
    """``sd`` with the separately given encoder's tensors added under ``cond_stage_model.*``.

    Raises:
        CheckpointError: ``sd`` already holds text-encoder weights (which one would be
            meant is ambiguous; a separate encoder is for checkpoints pruned of theirs).
    """
    own = sorted(k for k in sd if k.startswith(COND_STAGE_PREFIX))
    if own:
        raise CheckpointError(
            f"{checkpoint} has a conditioning encoder of its own, so the separately given text encoder "
            f"{text_encoder.source} would replace it; give text_encoder only for a checkpoint without one",
            unexpected=own,
        )
    return {**sd, **text_encoder.state_dict}
