"""LDM ``BERTEmbedder``: a small pre-norm transformer encoder over BERT token ids.

Layout reproduced from CompVis/latent-diffusion ``ldm/modules/encoders/modules.py``
(``BERTEmbedder``: ``TransformerWrapper(num_tokens=vocab_size, max_seq_len=77,
attn_layers=Encoder(dim=n_embed, depth=n_layer))``, called with
``return_embeddings=True``) and ``ldm/modules/x_transformer.py`` (read at commit
4ca0784; ``TransformerWrapper``, ``AttentionLayers``, ``Attention``, ``FeedForward``).
Those defaults fix the architecture: 8 heads of 64 channels, no bias on q/k/v,
feed-forward ``Linear(D, 4D) -> exact GELU -> Linear(4D, D)``, LayerNorm (eps 1e-5)
before every branch, a final LayerNorm, no masks of any kind (padding tokens are
attended), no scaling of the embeddings.

State-dict keys (what checkpoints store under ``cond_stage_model.``)::

    transformer.token_emb.weight                      [vocab, D]
    transformer.pos_emb.emb.weight                    [77, D]
    transformer.attn_layers.layers.{2i}.0.{weight,bias}       pre-norm of attention block i
    transformer.attn_layers.layers.{2i}.1.to_q.weight         [h*d, D]  (also to_k, to_v; no bias)
    transformer.attn_layers.layers.{2i}.1.to_out.{weight,bias} [D, h*d]
    transformer.attn_layers.layers.{2i+1}.0.{weight,bias}     pre-norm of feed-forward block i
    transformer.attn_layers.layers.{2i+1}.1.net.0.0.{weight,bias}  [4D, D]
    transformer.attn_layers.layers.{2i+1}.1.net.2.{weight,bias}    [D, 4D]
    transformer.norm.{weight,bias}
    transformer.to_logits.{weight,bias}               [vocab, D]  (unused: embeddings are returned)

``to_logits`` is kept only so that checkpoints load strictly; it is never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import BERTEmbedderConfig

__all__ = ["BERTEmbedder", "BERTTransformer"]


class _SelfAttention(nn.Module):
    """Unmasked multi-head self-attention; q/k/v without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, h, L, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, [B, h, L, d]
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class _FeedForward(nn.Module):
    """``net = [[Linear(D, 4D), GELU], Dropout, Linear(4D, D)]`` (indices as in the checkpoint)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()),
            nn.Dropout(0.0),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PreNormResidual(nn.ModuleList):
    """``x + branch(norm(x))`` with children named ``0`` (norm) and ``1`` (branch).

    The original stores ``[norm, branch, residual]`` in a ``ModuleList``; the
    parameter-free residual (index 2) is written out in ``forward`` instead.
    """

    def __init__(self, dim: int, branch: nn.Module) -> None:
        super().__init__([nn.LayerNorm(dim), branch])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, branch = self[0], self[1]
        return x + branch(norm(x))


class _AttentionLayers(nn.Module):
    """``depth`` pairs of (self-attention, feed-forward) pre-norm blocks in ``layers``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(_PreNormResidual(dim, _SelfAttention(dim, heads, dim_head)))
            blocks.append(_PreNormResidual(dim, _FeedForward(dim)))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


class _AbsolutePositionalEmbedding(nn.Module):
    """Learned position table ``emb`` indexed by ``0..L-1``."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        self.register_buffer("positions", torch.arange(max_seq_len, dtype=torch.long), persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        return self.emb(self.positions[:seq_len])  # [L, D]


class BERTTransformer(nn.Module):
    """The ``transformer`` level of ``BERTEmbedder`` (x-transformers ``TransformerWrapper``)."""

    def __init__(self, config: BERTEmbedderConfig) -> None:
        super().__init__()
        dim = config.n_embed
        self.token_emb = nn.Embedding(config.vocab_size, dim)
        self.pos_emb = _AbsolutePositionalEmbedding(dim, config.max_seq_len)
        self.attn_layers = _AttentionLayers(dim, config.n_layer, config.heads, config.dim_head)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, config.vocab_size)  # loaded, never run

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(input_ids) + self.pos_emb(input_ids.shape[1])  # [B, L, D]
        return self.norm(self.attn_layers(x))


class BERTEmbedder(nn.Module):
    """LDM text encoder: ``input_ids [B, 77] -> [B, 77, n_embed]`` (all token embeddings).

    Token ids come from :class:`ldm.tokenizers.BertTokenizer` (BERT uncased
    WordPiece, padded with ``[PAD]`` to 77).
    """

    def __init__(self, config: BERTEmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = BERTTransformer(config)

    @property
    def max_length(self) -> int:
        """Token sequence length of the position table (77)."""
        return self.config.max_seq_len

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids ``[B, L]`` (``L <= max_seq_len``) to ``[B, L, n_embed]``."""
        return self.transformer(input_ids)
