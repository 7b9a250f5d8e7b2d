"""Batch-invariant kernels (``ldm.kernels``): a row computed alone equals that row in any batch.

The shapes come from the module trees (every convolution, linear, attention and
normalization call of the UNet, text encoder and decoder in a real generation), for
the tiny random model and the bundled model, so new layers are covered by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldm.attention import AttentionBlock, CrossAttention
from ldm.autoencoder.blocks import AttnBlock
from ldm.backends import apply_backend
from ldm.engine.admission import AdmissionConfig
from ldm.engine.engine import ContinuousBatchEngine
from ldm.execution.core_pool import ShardedUNet
from ldm.kernels import (
    InvariantConv2d,
    InvariantCrossAttention,
    InvariantGEGLU,
    InvariantLinear,
    default_kernels,
    is_batch_invariant,
    make_batch_invariant,
    revert_batch_invariant,
)
from ldm.kernels.probe import record_layer_calls, row_batch
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from ldm_serve.models import bundled_model_path

SIZE = 32
KINDS = (InvariantConv2d, InvariantLinear, CrossAttention, InvariantGEGLU, AttentionBlock, AttnBlock,
         nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)  # fmt: skip
MAX_ROWS = 8


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("random"))


@pytest.fixture()
def one_thread():
    """The core workers' setting: one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(tiny_path: Path) -> list[Path]:
    bundled = bundled_model_path()
    return [tiny_path] + ([bundled] if bundled is not None else [])


def _layer_calls(pipe: LatentDiffusionPipeline, size: int):
    parts = [pipe.model.unet, pipe.model.first_stage, pipe.model.cond_stage]
    row = GenerationRow(
        "a red circle on the left", seed=0, negative_prompt="blue", steps=1, guidance_scale=5.0
    )
    return record_layer_calls(parts, lambda: pipe.generate([row], size, size), KINDS)


def _assert_rows_independent(fn, args: tuple, what: str) -> None:
    batch = row_batch(args, MAX_ROWS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = [
            fn(*(a[i : i + 1] if isinstance(a, torch.Tensor) else a for a in batch)) for i in range(MAX_ROWS)
        ]
        for n in range(2, MAX_ROWS + 1):
            out = fn(*(a[:n] if isinstance(a, torch.Tensor) else a for a in batch))
            for i in range(n):
                assert torch.equal(out[i : i + 1], alone[i]), (
                    f"{what}: row {i} of a batch of {n} differs from alone"
                )


@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_every_layer_shape_gives_each_row_its_value_alone(tiny_path: Path, which: str, one_thread) -> None:
    paths = _models(tiny_path)
    if which == "bundled" and len(paths) < 2:
        pytest.skip("bundled model not present")
    pipe = load_pipeline(paths[0 if which == "tiny" else 1], core_workers=2)
    assert all(
        is_batch_invariant(p) for p in (pipe.model.unet, pipe.model.first_stage, pipe.model.cond_stage)
    )
    size = SIZE if which == "tiny" else pipe.default_size
    calls = _layer_calls(pipe, size)
    kinds = {type(c.module) for c in calls}
    # the UNet's own classes (the invariant attention records both self- and cross-attention calls)
    assert {InvariantConv2d, InvariantLinear, InvariantCrossAttention, InvariantGEGLU} <= kinds, kinds
    roots = {c.name.split(".")[0] for c in calls if isinstance(c.module, InvariantLinear)}
    assert {
        "UNetModel",
        type(pipe.model.cond_stage).__name__,
    } <= roots  # linears of the UNet and text encoder
    decoder = type(pipe.model.first_stage).__name__
    assert any(c.name.startswith(decoder) and isinstance(c.module, InvariantConv2d)
               for c in calls)  # fmt: skip
    plain = [c for c in calls if not isinstance(c.module, (nn.Conv2d, nn.Linear))]
    assert plain, "no attention / normalization calls recorded"
    for call in calls:
        _assert_rows_independent(call.module, call.args, f"{call.name} {call.signature()}")


def test_traced_unet_keeps_invariance_and_matches_eager(tiny_path: Path, one_thread) -> None:
    """A frozen TorchScript trace keeps the kernels: a traced row is the row alone at any batch size."""
    pipe = load_pipeline(tiny_path, core_workers=2)
    unet = pipe.model.unet
    h = SIZE // pipe.downsample_factor
    example = (torch.randn(1, 4, h, h), torch.tensor([10]), torch.randn(1, pipe.max_prompt_tokens, 32))
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(unet.eval(), example, check_trace=False))
    args = (torch.randn(1, 4, h, h), torch.tensor([500]), torch.randn(1, pipe.max_prompt_tokens, 32))
    _assert_rows_independent(traced, args, "traced UNet")
    with torch.no_grad():
        torch.testing.assert_close(traced(*args), unet(*args), rtol=1e-4, atol=1e-5)


def test_conversion_keeps_weights_and_close_outputs(one_thread) -> None:
    conv, lin = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(8, 16)
    x, y = torch.randn(3, 8, 6, 6), torch.randn(3, 5, 8)
    with torch.no_grad():
        want_conv, want_lin = conv(x), lin(y)
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        make_batch_invariant(conv), make_batch_invariant(lin)
        assert isinstance(conv, InvariantConv2d) and isinstance(lin, InvariantLinear)
        assert all(torch.equal(state[k], v) for k, v in conv.state_dict().items())
        torch.testing.assert_close(conv(x), want_conv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin(y), want_lin, rtol=1e-5, atol=1e-5)
    seq = make_batch_invariant(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Linear(6, 6)))
    with torch.no_grad():
        want = seq(x)
        with default_kernels(seq):  # for exporters (ONNX)
            assert type(seq[0]) is nn.Conv2d and type(seq[1]) is nn.Linear and not is_batch_invariant(seq)
            torch.testing.assert_close(seq(x), want, rtol=1e-5, atol=1e-5)
    assert (
        is_batch_invariant(seq)
        and isinstance(seq[0], InvariantConv2d)
        and isinstance(seq[1], InvariantLinear)
    )
    revert_batch_invariant(seq)  # for other compilers, for good
    assert type(seq[0]) is nn.Conv2d and not is_batch_invariant(seq)
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    make_batch_invariant(grouped)
    assert type(grouped) is nn.Conv2d  # not a shape the invariant kernel covers: left as it is


def test_pooled_pipeline_runs_shards_and_backends_report_invariance(tiny_path: Path) -> None:
    pipe = load_pipeline(tiny_path, core_workers=2)
    unet = pipe.sampling_unet()
    assert isinstance(unet, ShardedUNet) and not unet.per_row  # one call per shard, not per row
    inline = load_pipeline(tiny_path, core_workers=1)
    assert not is_batch_invariant(inline.model.unet)  # rows stay one call each without a pool
    assert inline.sampling_unet().per_row
    assert not is_batch_invariant(lambda x: x)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_pipeline_and_engine_rows_equal_rows_alone(tiny_path: Path, backend: str, tmp_path: Path) -> None:
    """Mixed seeds, steps and guidance (CFG doubles some rows, not others) through generate and the engine."""
    pipe = load_pipeline(tiny_path, core_workers=2)
    apply_backend(pipe, backend, cache_dir=tmp_path)
    assert is_batch_invariant(pipe.model.unet) and is_batch_invariant(pipe.model.first_stage.decode)
    rows = [GenerationRow(f"a red circle {i}", seed=100 + i, negative_prompt="blue", steps=(5, 2, 4)[i % 3],
                          guidance_scale=(5.0, 1.0, 3.0)[i % 3]) for i in range(5)]  # fmt: skip
    alone = [np.asarray(pipe.generate([r], SIZE, SIZE)[0]) for r in rows]
    for n in (2, 5):
        batch = pipe.generate(rows[:n], SIZE, SIZE)
        assert all(np.array_equal(np.asarray(b), a) for b, a in zip(batch, alone, strict=False)), n
    engine = ContinuousBatchEngine(pipe, AdmissionConfig(max_rows=8))
    got = {}
    for step in range(20):
        if step < len(rows):
            engine.add(f"g{step}", [rows[step]], SIZE, SIZE)  # a row joins at every step
        if engine.idle:
            break
        rep = engine.step()
        assert rep.failed == ()
        got.update({im.group: np.asarray(im.image) for im in rep.images})
    assert all(np.array_equal(got[f"g{i}"], alone[i]) for i in range(len(rows)))


def test_fused_attention_and_feed_forward_keep_weights_and_close_outputs(one_thread) -> None:
    """The fused q/k/v and GEGLU kernels compute the plain modules' values from the same state dict."""
    from ldm.attention import BasicTransformerBlock

    block = BasicTransformerBlock(32, n_heads=2, d_head=16, context_dim=24).eval()
    x, context = torch.randn(3, 10, 32), torch.randn(3, 7, 24)
    one_token, one_ctx = torch.randn(3, 1, 32), torch.randn(3, 1, 24)  # the bmm path
    with torch.no_grad():
        want, want_one = block(x, context), block(one_token, one_ctx)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        make_batch_invariant(block)
        assert isinstance(block.attn1, InvariantCrossAttention) and isinstance(block.ff.net[0], InvariantGEGLU)
        assert block.state_dict().keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
        torch.testing.assert_close(block(x, context), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(block(one_token, one_ctx), want_one, rtol=1e-4, atol=1e-4)
        _assert_rows_independent(block, (x[:1], context[:1]), "transformer block")
        _assert_rows_independent(block, (one_token[:1], one_ctx[:1]), "transformer block, one token")
        revert_batch_invariant(block)
        assert type(block.attn1) is CrossAttention and type(block.ff.net[0]).__name__ == "GEGLU"
        torch.testing.assert_close(block(x, context), want, rtol=1e-6, atol=1e-6)
