"""Our first-stage autoencoders against diffusers' implementations, with the same weights.

KL: the weights go through diffusers' own single-file converter
(``create_vae_diffusers_config_from_ldm`` + ``convert_ldm_vae_checkpoint``), so this
also checks that our state dict has the original CompVis key layout.
VQ: diffusers ships no single-file VQ converter, so the key mapping
(original -> diffusers ``VQModel``) is written here, from the diffusers module names.
"""

from __future__ import annotations

import re

import pytest
import torch

from ldm.autoencoder import AutoencoderKL, VQModel, build_first_stage
from ldm.config import AutoencoderConfig
from ldm.tiny import randomize_weights_
from tests.tiny import AE_KL_F8, AE_VQ_F4, AE_VQ_F4_NOATTN

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.parity

REL_TOL = 1e-5


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|``."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def original_config(config: AutoencoderConfig) -> dict:
    """The LDM YAML structure (``model.params.first_stage_config.params``) diffusers' converter reads."""
    ddconfig = {
        "double_z": config.double_z,
        "z_channels": config.z_channels,
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "out_ch": config.out_ch,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": list(config.attn_resolutions),
        "dropout": 0.0,
    }
    return {
        "model": {
            "params": {
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig},
                }
            }
        }
    }


@pytest.fixture(scope="module")
def kl_pair() -> tuple[AutoencoderKL, torch.nn.Module]:
    ours = build_first_stage(AE_KL_F8)
    assert isinstance(ours, AutoencoderKL)
    randomize_weights_(ours, seed=1).eval()
    # as stored in an LDM checkpoint, under the first_stage_model. prefix
    checkpoint = {f"first_stage_model.{k}": v.clone() for k, v in ours.state_dict().items()}
    cfg = single_file_utils.create_vae_diffusers_config_from_ldm(original_config(AE_KL_F8), checkpoint)
    converted = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, cfg)
    ref = diffusers.AutoencoderKL(**cfg)
    ref.load_state_dict(converted, strict=True)  # every diffusers tensor comes from one of ours
    return ours, ref.eval()


@torch.no_grad()
def test_kl_encoder_matches_diffusers(kl_pair) -> None:
    ours, ref = kl_pair
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    post = ours.encode(x)
    ref_post = ref.encode(x).latent_dist
    assert post.mean.shape == (2, AE_KL_F8.embed_dim, 8, 8)
    assert max_rel_err(post.mean, ref_post.mean) <= REL_TOL
    assert max_rel_err(post.logvar, ref_post.logvar) <= REL_TOL
    assert max_rel_err(post.std, ref_post.std) <= REL_TOL


@torch.no_grad()
def test_kl_decoder_matches_diffusers(kl_pair) -> None:
    ours, ref = kl_pair
    z = torch.randn(2, AE_KL_F8.embed_dim, 8, 8, generator=torch.Generator().manual_seed(2))
    out = ours.decode(z)
    assert out.shape == (2, 3, 64, 64)
    assert max_rel_err(out, ref.decode(z).sample) <= REL_TOL


_VQ_RULES: list[tuple[str, str]] = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]


def original_to_diffusers_vq(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename CompVis VQModel keys to diffusers ``VQModel`` keys.

    ``decoder.up.{i}`` is stored highest resolution first, diffusers' ``up_blocks``
    lowest first, hence ``up_blocks.{L-1-i}``; attention 1x1 convs become Linear weights.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample\.conv)\.", key)
        if m:
            level = num_levels - 1 - int(m.group(1))
            inner = "resnets" if m.group(2) == "block" else "upsamplers.0.conv"
            new = f"decoder.up_blocks.{level}.{inner}." + key[m.end() :]
        for pattern, repl in _VQ_RULES:
            new = re.sub(pattern, repl, new)
        if ".attentions." in new and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def diffusers_vq(config: AutoencoderConfig) -> torch.nn.Module:
    levels = len(config.ch_mult)
    return diffusers.VQModel(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        num_vq_embeddings=config.n_embed,
        vq_embed_dim=config.embed_dim,
        mid_block_add_attention=config.attn_type != "none",
    )


@pytest.mark.parametrize("config", [AE_VQ_F4, AE_VQ_F4_NOATTN], ids=["vq-f4", "vq-f4-noattn"])
@torch.no_grad()
def test_vq_matches_diffusers(config: AutoencoderConfig) -> None:
    ours = build_first_stage(config)
    assert isinstance(ours, VQModel)
    randomize_weights_(ours, seed=3).eval()
    ref = diffusers_vq(config)
    ref.load_state_dict(original_to_diffusers_vq(ours.state_dict(), len(config.ch_mult)), strict=True)
    ref.eval()

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    h = ours.encode(x)
    ref_h = ref.encode(x).latents
    assert h.shape == (2, config.embed_dim, 8, 8)
    assert max_rel_err(h, ref_h) <= REL_TOL

    # decode quantizes first; feed both the same h so the codes are comparable
    h = torch.randn(2, config.embed_dim, 8, 8, generator=torch.Generator().manual_seed(5))
    _, _, (_, _, ref_codes) = ref.quantize(h)
    assert torch.equal(ours.quantize.codes(h).flatten(), ref_codes.flatten())
    out = ours.decode(h)
    assert out.shape == (2, 3, 32, 32)
    assert max_rel_err(out, ref.decode(h, force_not_quantize=False).sample) <= REL_TOL
