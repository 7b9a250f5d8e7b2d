"""Unit tests of ``ldm.autoencoder``: checkpoint key layout, shapes, posterior, quantizer, tracing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, VQModel, build_first_stage
from ldm.config import AutoencoderConfig
from ldm.tiny import randomize_weights_
from ldm_serve.errors import ConfigError
from tests.tiny import AE_KL_F8, AE_VQ_F4, AE_VQ_F4_NOATTN

# torch's own GroupNorm input check warns while tracing; it does not affect the graph.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:TF32 acceleration:UserWarning")

# kl-f8 (SD VAE) layout at a quarter of the width: 4 levels, 2 res blocks, f = 8.
KL_F8_LIKE = replace(AE_KL_F8, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


def _resnet_keys(prefix: str, c_in: int, c_out: int) -> set[str]:
    keys = {f"{prefix}.{p}.{t}" for p in ("norm1", "conv1", "norm2", "conv2") for t in ("weight", "bias")}
    if c_in != c_out:
        keys |= {f"{prefix}.nin_shortcut.weight", f"{prefix}.nin_shortcut.bias"}
    return keys


def _attn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{p}.{t}" for p in ("norm", "q", "k", "v", "proj_out") for t in ("weight", "bias")}


def _wb(name: str) -> set[str]:
    return {f"{name}.weight", f"{name}.bias"}


def expected_keys(cfg: AutoencoderConfig) -> set[str]:
    """The CompVis ``model.py``/``autoencoder.py`` key set, written out from the layout rules."""
    vanilla = cfg.attn_type == "vanilla"
    n = len(cfg.ch_mult)
    chans = [cfg.ch * m for m in cfg.ch_mult]
    keys = _wb("encoder.conv_in") | _wb("decoder.conv_in")
    res = cfg.resolution
    c = cfg.ch
    for i in range(n):  # encoder: num_res_blocks per level, downsample except on the last
        for j in range(cfg.num_res_blocks):
            keys |= _resnet_keys(f"encoder.down.{i}.block.{j}", c, chans[i])
            c = chans[i]
            if vanilla and res in cfg.attn_resolutions:
                keys |= _attn_keys(f"encoder.down.{i}.attn.{j}")
        if i < n - 1:
            keys |= _wb(f"encoder.down.{i}.downsample.conv")
            res //= 2
    for part in ("encoder", "decoder"):
        keys |= _resnet_keys(f"{part}.mid.block_1", chans[-1], chans[-1])
        keys |= _resnet_keys(f"{part}.mid.block_2", chans[-1], chans[-1])
        if vanilla:  # built even when attn_resolutions is empty
            keys |= _attn_keys(f"{part}.mid.attn_1")
        keys |= _wb(f"{part}.norm_out") | _wb(f"{part}.conv_out")
    c = chans[-1]
    for i in reversed(range(n)):  # decoder: applied from i = n-1 down to 0, num_res_blocks + 1 blocks
        for j in range(cfg.num_res_blocks + 1):
            keys |= _resnet_keys(f"decoder.up.{i}.block.{j}", c, chans[i])
            c = chans[i]
            if vanilla and res in cfg.attn_resolutions:
                keys |= _attn_keys(f"decoder.up.{i}.attn.{j}")
        if i > 0:
            keys |= _wb(f"decoder.up.{i}.upsample.conv")
            res *= 2
    keys |= _wb("quant_conv") | _wb("post_quant_conv")
    if cfg.kind == "vq":
        keys.add("quantize.embedding.weight")
    return keys


@pytest.mark.parametrize(
    "cfg",
    [
        KL_F8_LIKE,
        replace(KL_F8_LIKE, attn_resolutions=(32,)),  # attention at the lowest (32 px) level
        AE_VQ_F4,
        AE_VQ_F4_NOATTN,
        replace(AE_VQ_F4_NOATTN, attn_resolutions=(64,)),
    ],
    ids=["kl-f8", "kl-f8-attn32", "vq-f4", "vq-f4-noattn", "vq-f4-noattn-attn64"],
)
def test_state_dict_keys_follow_compvis_layout(cfg: AutoencoderConfig) -> None:
    assert set(build_first_stage(cfg).state_dict()) == expected_keys(cfg)


def test_kl_f8_key_spot_checks_and_shapes() -> None:
    sd = build_first_stage(KL_F8_LIKE).state_dict()
    assert "decoder.up.0.block.2.conv2.weight" in sd  # num_res_blocks + 1 decoder blocks
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)  # up.0 is the last level applied
    assert not any(k.startswith("encoder.down.3.downsample") for k in sd)
    assert "decoder.up.3.upsample.conv.weight" in sd
    assert "encoder.mid.attn_1.q.weight" in sd and "decoder.mid.attn_1.proj_out.bias" in sd
    assert not any(".attn." in k for k in sd)  # attn_resolutions = []
    shapes = {
        "encoder.conv_in.weight": (32, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "encoder.mid.attn_1.q.weight": (128, 128, 1, 1),
        "encoder.conv_out.weight": (8, 128, 3, 3),  # 2 * z_channels (double_z)
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (128, 4, 3, 3),
        "decoder.up.3.block.0.conv1.weight": (128, 128, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (64, 128, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
        "decoder.conv_out.weight": (3, 32, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_noattn_has_no_mid_attention() -> None:
    assert not any("attn" in k for k in build_first_stage(AE_VQ_F4_NOATTN).state_dict())
    assert "decoder.mid.attn_1.norm.weight" in build_first_stage(AE_VQ_F4).state_dict()


def _seeded(cfg: AutoencoderConfig, seed: int = 0) -> AutoencoderKL | VQModel:
    return randomize_weights_(build_first_stage(cfg), seed=seed).eval()


def _image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("hw", [(64, 64), (32, 48)])
def test_kl_shapes_f8(hw: tuple[int, int]) -> None:
    model = _seeded(AE_KL_F8)
    assert AE_KL_F8.downsample_factor == 8
    post = model.encode(_image(1, *hw))
    lat = (1, AE_KL_F8.embed_dim, hw[0] // 8, hw[1] // 8)
    assert post.mean.shape == post.logvar.shape == post.std.shape == lat
    assert model.decode(post.sample()).shape == (1, 3, *hw)


@torch.no_grad()
def test_vq_shapes_f4() -> None:
    model = _seeded(AE_VQ_F4)
    assert AE_VQ_F4.downsample_factor == 4
    h = model.encode(_image(2, 32, 48))
    assert h.shape == (2, AE_VQ_F4.embed_dim, 8, 12)
    assert model.decode(h).shape == (2, 3, 32, 48)


def test_sample_is_reproducible_and_seed_dependent() -> None:
    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    post = DiagonalGaussianDistribution(params)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, params[:, :4] + torch.exp(0.5 * params[:, 4:]) * eps)
    assert torch.equal(post.mode(), params[:, :4])
    assert post.sample().shape == (2, 4, 4, 4)


def test_logvar_is_clamped() -> None:
    mean = torch.zeros(1, 2, 1, 1)
    logvar = torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert post.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(post.std.flatten(), torch.tensor([10.0, -15.0]).exp())


@torch.no_grad()
def test_quantize_returns_nearest_codebook_rows() -> None:
    model = _seeded(AE_VQ_F4)
    codebook = model.quantize.embedding.weight  # [n_embed, embed_dim]
    h = torch.randn(2, AE_VQ_F4.embed_dim, 5, 7, generator=torch.Generator().manual_seed(1))
    hq = model.quantize(h)
    assert hq.shape == h.shape and hq.is_contiguous()  # plain NCHW, not the permuted layout
    vectors = h.permute(0, 2, 3, 1).reshape(-1, AE_VQ_F4.embed_dim)
    nearest = torch.cdist(vectors, codebook).argmin(dim=1)
    assert torch.equal(hq.permute(0, 2, 3, 1).reshape(-1, AE_VQ_F4.embed_dim), codebook[nearest])
    assert torch.equal(model.quantize(hq), hq)  # codebook rows are fixed points
    assert torch.equal(model.decode(h), model.decode(hq))


class _Decode(torch.nn.Module):
    """What a compile step traces: ``model.decode`` as ``forward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [AE_KL_F8, AE_VQ_F4, AE_VQ_F4_NOATTN], ids=["kl", "vq", "vq-noattn"])
def test_traced_decode_equals_eager(cfg: AutoencoderConfig) -> None:
    model = _seeded(cfg)
    side = 32 // cfg.downsample_factor
    z = torch.randn(2, cfg.embed_dim, side, side, generator=torch.Generator().manual_seed(3))
    traced = torch.jit.trace(_Decode(model), z, check_trace=False)
    torch.testing.assert_close(traced(z), model.decode(z), rtol=0, atol=1e-6)
    z3 = torch.randn(3, cfg.embed_dim, side, side, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(traced(z3), model.decode(z3), rtol=0, atol=1e-6)  # other batch size


@torch.no_grad()
@pytest.mark.parametrize("cfg", [AE_KL_F8, AE_VQ_F4], ids=["kl", "vq"])
def test_decode_rows_are_independent(cfg: AutoencoderConfig) -> None:
    """Row i decoded alone equals row i of a batch: nothing in the model mixes rows.

    Bit-identity is checked with oneDNN off: its CPU convolutions pick a batch-size
    dependent blocking, so with it on rows agree only to rounding (checked too).
    """
    model = _seeded(cfg)
    side = 32 // cfg.downsample_factor
    z = torch.randn(3, cfg.embed_dim, side, side, generator=torch.Generator().manual_seed(5))
    with torch.backends.mkldnn.flags(enabled=False):
        batch = model.decode(z)
        for i in range(3):
            assert torch.equal(model.decode(z[i : i + 1]), batch[i : i + 1]), i
    batch = model.decode(z)
    for i in range(3):
        torch.testing.assert_close(model.decode(z[i : i + 1]), batch[i : i + 1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [AE_KL_F8, AE_VQ_F4], ids=["kl", "vq"])
def test_half_precision_weights_take_fp32_inputs(cfg: AutoencoderConfig, dtype: torch.dtype) -> None:
    model = _seeded(cfg)
    half = _seeded(cfg).to(dtype)
    x = _image(1, 32, 32)
    enc, enc_half = model.encode(x), half.encode(x)
    if cfg.kind == "kl":
        enc, enc_half = enc.mean, enc_half.mean
    assert enc_half.dtype == dtype
    torch.testing.assert_close(enc_half.float(), enc, rtol=0.1, atol=0.1)
    side = 32 // cfg.downsample_factor
    z = torch.randn(1, cfg.embed_dim, side, side, generator=torch.Generator().manual_seed(6)) * 0.3
    out = half.decode(z)
    assert out.dtype == dtype and out.shape == (1, 3, 32, 32)
    ref = model.decode(z)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 0.1


@pytest.mark.parametrize(
    "cfg",
    [
        replace(AE_KL_F8, kind="ae"),
        replace(AE_KL_F8, attn_type="linear"),
        replace(AE_KL_F8, double_z=False),
        replace(AE_VQ_F4, n_embed=0),
    ],
    ids=["kind", "attn-linear", "kl-single-z", "vq-no-codebook"],
)
def test_unsupported_configs_raise_config_error(cfg: AutoencoderConfig) -> None:
    with pytest.raises(ConfigError):
        build_first_stage(cfg)


def test_build_first_stage_picks_class() -> None:
    assert type(build_first_stage(AE_KL_F8)) is AutoencoderKL
    assert type(build_first_stage(AE_VQ_F4)) is VQModel
