"""CLIP text transformer (SD 1.x ``FrozenCLIPEmbedder``, SD 2.x via key conversion).

Parameter names equal ``transformers.CLIPTextModel``'s 4.x state dict, i.e. what
SD 1.x checkpoints store under ``cond_stage_model.transformer.``::

    text_model.embeddings.token_embedding.weight          [vocab, W]
    text_model.embeddings.position_embedding.weight       [77, W]
    text_model.encoder.layers.N.layer_norm1.{weight,bias}
    text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.N.layer_norm2.{weight,bias}
    text_model.encoder.layers.N.mlp.fc1.{weight,bias}     [I, W]
    text_model.encoder.layers.N.mlp.fc2.{weight,bias}     [W, I]
    text_model.final_layer_norm.{weight,bias}

Checkpoints also carry ``text_model.embeddings.position_ids``; some merged SD 1.x
files hold a float-cast, garbled copy. Position ids are therefore never loaded:
they are a non-persistent ``arange`` and the loader drops :data:`CLIP_IGNORED_KEYS`.

Forward matches SD: causal self-attention, no padding mask (padding tokens are
attended like any other), pre-norm residual blocks, then ``final_layer_norm``
applied to the last layer's output (``layer="last"``) or to the second-to-last
layer's output (``layer="penultimate"``, SD 2.x / clip skip 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import CLIPTextConfig
from ldm_serve.errors import ConfigError

__all__ = ["CLIP_IGNORED_KEYS", "CLIPTextEncoder"]

CLIP_IGNORED_KEYS: tuple[str, ...] = ("text_model.embeddings.position_ids",)
"""Checkpoint keys (after stripping ``cond_stage_model.transformer.``) to drop, not load."""


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Regenerated, never loaded: checkpoints may hold a corrupted copy.
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings, dtype=torch.long), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = self.position_ids[:seq_len]  # [L]
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # [B, L, W]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        if width % self.num_heads:
            raise ConfigError(f"hidden_size {width} is not divisible by {self.num_heads} heads")
        self.head_dim = width // self.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(d)) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class CLIPMLP(nn.Module):
    """``fc1 -> activation -> fc2``; activation ``quick_gelu`` (OpenAI) or exact ``gelu`` (OpenCLIP)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"unsupported CLIP activation {config.hidden_act!r}")
        self.quick = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = _quick_gelu(h) if self.quick else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoderStack(nn.Module):
    """Holds the blocks as ``layers.N`` (the ``encoder.`` level of the key names)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """The ``text_model`` level: embeddings, encoder stack, final layer norm."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoderStack(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text encoder: ``input_ids [B, 77] -> hidden states [B, 77, hidden_size]``.

    ``config.layer`` picks which block's output goes through ``final_layer_norm``:
    ``"last"`` (SD 1.x, ``last_hidden_state``) or ``"penultimate"`` (SD 2.x).
    With ``"penultimate"`` the last block is kept (checkpoints store it) but never run.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        if config.layer not in ("last", "penultimate"):
            raise ConfigError(f"unknown CLIP layer option {config.layer!r}")
        if config.layer == "penultimate" and config.num_hidden_layers < 2:
            raise ConfigError("layer='penultimate' needs at least two transformer layers")
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.num_layers_run = config.num_hidden_layers - (1 if config.layer == "penultimate" else 0)

    @property
    def max_length(self) -> int:
        """Token sequence length the encoder was trained with (77)."""
        return self.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids ``[B, L]`` (``L <= max_length``) to ``[B, L, hidden_size]``."""
        tm = self.text_model
        x = tm.embeddings(input_ids)  # [B, L, W]
        for layer in tm.encoder.layers[: self.num_layers_run]:
            x = layer(x)
        return tm.final_layer_norm(x)
