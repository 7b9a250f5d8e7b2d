"""Conditioning encoders: checkpoint key layout, shapes, masking behaviour, tracing."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config import CLIPTextConfig
from ldm.encoders import (
    CLIP_IGNORED_KEYS,
    BERTEmbedder,
    ClassEmbedder,
    CLIPTextEncoder,
    build_cond_stage_model,
    openclip_to_clip_state_dict,
)
from ldm.tiny import randomize_weights_
from ldm_serve.errors import CheckpointError
from tests.tiny import BERT_TINY, CLASS_TINY, CLIP_TINY


def _ids(batch: int, vocab: int, seed: int = 0, length: int = 77) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip() -> CLIPTextEncoder:
    return randomize_weights_(CLIPTextEncoder(CLIP_TINY), seed=1).eval()


@pytest.fixture(scope="module")
def bert() -> BERTEmbedder:
    return randomize_weights_(BERTEmbedder(BERT_TINY), seed=2).eval()


# ---------------------------------------------------------------- key layouts


def test_bert_state_dict_keys_match_ldm_bert_embedder() -> None:
    # Written from x_transformer.TransformerWrapper(Encoder(dim, depth=2)): layers
    # alternate attention ('a') and feed-forward ('f'), each [norm, block, residual].
    expected = {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight"}
    for block in range(2):
        attn, ff = f"transformer.attn_layers.layers.{2 * block}", f"transformer.attn_layers.layers.{2 * block + 1}"
        expected |= {f"{attn}.0.weight", f"{attn}.0.bias"}
        expected |= {f"{attn}.1.to_q.weight", f"{attn}.1.to_k.weight", f"{attn}.1.to_v.weight"}
        expected |= {f"{attn}.1.to_out.weight", f"{attn}.1.to_out.bias"}
        expected |= {f"{ff}.0.weight", f"{ff}.0.bias"}
        expected |= {f"{ff}.1.net.0.0.weight", f"{ff}.1.net.0.0.bias", f"{ff}.1.net.2.weight", f"{ff}.1.net.2.bias"}
    expected |= {"transformer.norm.weight", "transformer.norm.bias"}
    expected |= {"transformer.to_logits.weight", "transformer.to_logits.bias"}
    sd = BERTEmbedder(BERT_TINY).state_dict()
    assert set(sd) == expected
    inner = BERT_TINY.heads * BERT_TINY.dim_head
    assert sd["transformer.attn_layers.layers.0.1.to_q.weight"].shape == (inner, BERT_TINY.n_embed)
    assert sd["transformer.attn_layers.layers.1.1.net.0.0.weight"].shape == (4 * BERT_TINY.n_embed, BERT_TINY.n_embed)
    assert sd["transformer.pos_emb.emb.weight"].shape == (77, BERT_TINY.n_embed)


def test_clip_state_dict_keys_match_sd1_checkpoint_layout() -> None:
    expected = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    for n in range(CLIP_TINY.num_hidden_layers):
        for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
        ):  # fmt: skip
            expected |= {f"text_model.encoder.layers.{n}.{name}.weight", f"text_model.encoder.layers.{n}.{name}.bias"}
    sd = CLIPTextEncoder(CLIP_TINY).state_dict()
    assert set(sd) == expected
    # The checkpoint's position_ids must be dropped by the loader, never loaded.
    assert CLIP_IGNORED_KEYS == ("text_model.embeddings.position_ids",)
    assert not set(CLIP_IGNORED_KEYS) & set(sd)


def test_clip_ignores_corrupted_checkpoint_position_ids(clip: CLIPTextEncoder) -> None:
    ids = _ids(2, CLIP_TINY.vocab_size)
    with torch.no_grad():
        before = clip(ids)
    fresh = CLIPTextEncoder(CLIP_TINY).eval()
    ckpt = dict(clip.state_dict())
    ckpt["text_model.embeddings.position_ids"] = (torch.arange(77) + 0.4).float()[None]  # a merged-model artefact
    fresh.load_state_dict({k: v for k, v in ckpt.items() if k not in CLIP_IGNORED_KEYS})
    with torch.no_grad():
        assert torch.equal(fresh(ids), before)


# ---------------------------------------------------------------- shapes


def test_bert_forward_shape(bert: BERTEmbedder) -> None:
    with torch.no_grad():
        out = bert(_ids(3, BERT_TINY.vocab_size))
    assert out.shape == (3, 77, BERT_TINY.n_embed)
    assert torch.isfinite(out).all()


def test_class_embedder_shape_and_rows() -> None:
    emb = randomize_weights_(ClassEmbedder(CLASS_TINY))
    assert set(emb.state_dict()) == {"embedding.weight"}
    ids = torch.tensor([3, 0, 10])
    out = emb(ids)
    assert out.shape == (3, 1, CLASS_TINY.embed_dim)
    assert torch.equal(out[:, 0], emb.embedding.weight[ids])


def test_build_cond_stage_model_dispatch() -> None:
    assert isinstance(build_cond_stage_model(CLIP_TINY), CLIPTextEncoder)
    assert isinstance(build_cond_stage_model(BERT_TINY), BERTEmbedder)
    assert isinstance(build_cond_stage_model(CLASS_TINY), ClassEmbedder)


# ---------------------------------------------------------------- behaviour


def _reference_ldm_bert(sd: dict[str, torch.Tensor], ids: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """x-transformers encoder written out with plain tensor ops (explicit softmax attention)."""

    def ln(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def split(t: torch.Tensor) -> torch.Tensor:
        b, n, inner = t.shape
        return t.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3)

    x = sd["transformer.token_emb.weight"][ids] + sd["transformer.pos_emb.emb.weight"][: ids.shape[1]]
    for i in range(depth):
        a, f = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
        h = ln(x, f"{a}.0")
        q, k, v = (split(h @ sd[f"{a}.1.to_{n}.weight"].T) for n in "qkv")
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        o = (attn @ v).permute(0, 2, 1, 3).flatten(2)
        x = x + o @ sd[f"{a}.1.to_out.weight"].T + sd[f"{a}.1.to_out.bias"]
        h = ln(x, f"{f}.0")
        h = torch.nn.functional.gelu(h @ sd[f"{f}.1.net.0.0.weight"].T + sd[f"{f}.1.net.0.0.bias"])
        x = x + h @ sd[f"{f}.1.net.2.weight"].T + sd[f"{f}.1.net.2.bias"]
    return ln(x, "transformer.norm")


def test_bert_matches_written_out_reference(bert: BERTEmbedder) -> None:
    ids = _ids(2, BERT_TINY.vocab_size, seed=5)
    with torch.no_grad():
        ours = bert(ids)
        ref = _reference_ldm_bert(bert.state_dict(), ids, BERT_TINY.n_layer, BERT_TINY.heads)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bert_is_not_causal(bert: BERTEmbedder) -> None:
    ids = _ids(1, BERT_TINY.vocab_size, seed=6)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % BERT_TINY.vocab_size
    with torch.no_grad():
        a, b = bert(ids), bert(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token sees the last one


def test_clip_is_causal(clip: CLIPTextEncoder) -> None:
    ids = _ids(1, CLIP_TINY.vocab_size, seed=7)
    changed = ids.clone()
    changed[0, 40] = (changed[0, 40] + 1) % CLIP_TINY.vocab_size
    with torch.no_grad():
        a, b = clip(ids), clip(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_penultimate_skips_last_layer_and_applies_final_norm() -> None:
    cfg = CLIPTextConfig(**{**CLIP_TINY.__dict__, "layer": "penultimate"})
    enc = randomize_weights_(CLIPTextEncoder(cfg), seed=3).eval()
    ids = _ids(2, cfg.vocab_size, seed=8)
    with torch.no_grad():
        before = enc(ids)
        last = enc.text_model.encoder.layers[-1]
        for p in last.parameters():
            p.add_(1.0)  # the last block must not influence the output
        assert torch.equal(enc(ids), before)
        enc.text_model.final_layer_norm.bias.add_(1.0)
        assert torch.allclose(enc(ids), before + 1.0, atol=1e-6)


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_rows_are_independent(which: str, clip: CLIPTextEncoder, bert: BERTEmbedder) -> None:
    model, vocab = (clip, CLIP_TINY.vocab_size) if which == "clip" else (bert, BERT_TINY.vocab_size)
    ids = _ids(3, vocab, seed=9)
    with torch.no_grad():
        batch = model(ids)
        for row in range(3):
            alone = model(ids[row : row + 1])
            assert torch.allclose(batch[row : row + 1], alone, atol=1e-6, rtol=1e-5)


def test_clip_jit_trace_matches_eager(clip: CLIPTextEncoder) -> None:
    ids = _ids(2, CLIP_TINY.vocab_size, seed=10)
    with torch.no_grad():
        traced = torch.jit.trace(clip, (ids,))
        other = _ids(3, CLIP_TINY.vocab_size, seed=11)  # another batch size through the same trace
        assert torch.allclose(traced(ids), clip(ids), atol=1e-6)
        assert torch.allclose(traced(other), clip(other), atol=1e-6)


def test_bert_jit_trace_matches_eager(bert: BERTEmbedder) -> None:
    ids = _ids(2, BERT_TINY.vocab_size, seed=12)
    with torch.no_grad():
        traced = torch.jit.trace(bert, (ids,))
        assert torch.allclose(traced(ids), bert(ids), atol=1e-6)


# ---------------------------------------------------------------- OpenCLIP keys


def test_openclip_split_of_fused_in_proj() -> None:
    w = 8
    in_w = torch.randn(3 * w, w)
    in_b = torch.randn(3 * w)
    sd = {
        "transformer.resblocks.0.attn.in_proj_weight": in_w,
        "transformer.resblocks.0.attn.in_proj_bias": in_b,
        "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(2 * w, w),
        "ln_final.bias": torch.randn(w),
        "text_projection": torch.randn(w, w),
        "logit_scale": torch.tensor(4.6),
    }
    out = openclip_to_clip_state_dict(sd, num_layers=1)
    pre = "text_model.encoder.layers.0.self_attn"
    assert torch.equal(out[f"{pre}.q_proj.weight"], in_w[:w])
    assert torch.equal(out[f"{pre}.k_proj.weight"], in_w[w : 2 * w])
    assert torch.equal(out[f"{pre}.v_proj.bias"], in_b[2 * w :])
    assert out["text_model.encoder.layers.0.mlp.fc1.weight"] is sd["transformer.resblocks.0.mlp.c_fc.weight"]
    assert "text_model.final_layer_norm.bias" in out
    assert not any("projection" in k or "logit" in k for k in out)


@pytest.mark.parametrize(
    "key", ["visual.conv1.weight", "transformer.resblocks.5.ln_1.weight", "transformer.resblocks.0.attn.foo.weight"]
)
def test_openclip_rejects_foreign_keys(key: str) -> None:
    with pytest.raises(CheckpointError) as info:
        openclip_to_clip_state_dict({key: torch.zeros(1)}, num_layers=2)
    assert info.value.unexpected == [key]
