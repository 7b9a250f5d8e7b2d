"""Conditioning encoders (``cond_stage_model``): CLIP text, LDM BERT, class embedding."""

from __future__ import annotations

from torch import nn

from ldm.config import BERTEmbedderConfig, ClassEmbedderConfig, CLIPTextConfig, CondStageConfig
from ldm.encoders.bert import BERTEmbedder
from ldm.encoders.class_embedder import ClassEmbedder
from ldm.encoders.clip import CLIP_IGNORED_KEYS, CLIPTextEncoder
from ldm.encoders.openclip_keys import (
    OPENCLIP_DROPPED_KEYS,
    clip_to_openclip_state_dict,
    openclip_to_clip_state_dict,
)
from ldm_serve.errors import ConfigError

__all__ = [
    "CLIP_IGNORED_KEYS",
    "OPENCLIP_DROPPED_KEYS",
    "BERTEmbedder",
    "CLIPTextEncoder",
    "ClassEmbedder",
    "build_cond_stage_model",
    "clip_to_openclip_state_dict",
    "openclip_to_clip_state_dict",
]


def build_cond_stage_model(config: CondStageConfig) -> nn.Module:
    """The encoder module for a ``cond_stage`` config (CLIP text, LDM BERT or class embedding)."""
    if isinstance(config, CLIPTextConfig):
        return CLIPTextEncoder(config)
    if isinstance(config, BERTEmbedderConfig):
        return BERTEmbedder(config)
    if isinstance(config, ClassEmbedderConfig):
        return ClassEmbedder(config)
    raise ConfigError(f"no conditioning encoder for config type {type(config).__name__}")
