"""LDM ``ClassEmbedder``: one learned vector per class label, as a 1-token context.

CompVis/latent-diffusion ``ldm/modules/encoders/modules.py``: ``nn.Embedding(n_classes,
embed_dim)`` applied to ``batch[key][:, None]``. The checkpoint key is
``cond_stage_model.embedding.weight``, i.e. ``embedding.weight`` here.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.config import ClassEmbedderConfig

__all__ = ["ClassEmbedder"]


class ClassEmbedder(nn.Module):
    """``class_ids [B] long -> [B, 1, embed_dim]`` cross-attention context."""

    def __init__(self, config: ClassEmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.n_classes, config.embed_dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_ids[:, None])  # [B, 1, D]
