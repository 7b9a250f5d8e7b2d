"""Key conversion between OpenCLIP's text tower (SD 2.x) and :class:`CLIPTextEncoder`.

SD 2.x checkpoints store ``FrozenOpenCLIPEmbedder`` (Stability-AI/stablediffusion
``ldm/modules/encoders/modules.py``) under ``cond_stage_model.model.``; after
stripping that prefix the text-tower keys are::

    token_embedding.weight                             -> text_model.embeddings.token_embedding.weight
    positional_embedding              [77, W]          -> text_model.embeddings.position_embedding.weight
    transformer.resblocks.N.ln_1.*                     -> text_model.encoder.layers.N.layer_norm1.*
    transformer.resblocks.N.attn.in_proj_weight [3W, W] -> ...self_attn.{q,k,v}_proj.weight (rows q | k | v)
    transformer.resblocks.N.attn.in_proj_bias   [3W]    -> ...self_attn.{q,k,v}_proj.bias
    transformer.resblocks.N.attn.out_proj.*            -> ...self_attn.out_proj.*
    transformer.resblocks.N.ln_2.*                     -> ...layer_norm2.*
    transformer.resblocks.N.mlp.c_fc.*                 -> ...mlp.fc1.*
    transformer.resblocks.N.mlp.c_proj.*               -> ...mlp.fc2.*
    ln_final.*                                         -> text_model.final_layer_norm.*
    text_projection, logit_scale                       -> dropped (unused for conditioning)

The matching encoder config uses ``hidden_act="gelu"``, ``layer="penultimate"``
and a tokenizer padding with ``"!"`` (id 0). Converted tensors may share storage
with the input (q/k/v are views of ``in_proj``); ``load_state_dict`` copies them.
"""

from __future__ import annotations

import re

import torch

from ldm_serve.errors import CheckpointError

__all__ = ["OPENCLIP_DROPPED_KEYS", "clip_to_openclip_state_dict", "openclip_to_clip_state_dict"]

OPENCLIP_DROPPED_KEYS: tuple[str, ...] = ("text_projection", "logit_scale", "attn_mask")
"""OpenCLIP keys with no counterpart in the conditioning encoder; dropped on conversion."""

_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}

# Per-block names other than the fused in_proj.
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

# "transformer.resblocks.N.<name>.weight" and "transformer.resblocks.N.attn.in_proj_weight".
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(?:(attn\.in_proj)_|(.+)\.)(weight|bias)$")
_OURS_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_to_clip_state_dict(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP text tower's tensors to :class:`CLIPTextEncoder` keys.

    Args:
        sd: keys already stripped of ``cond_stage_model.model.``.
        num_layers: transformer depth of the target encoder (24 for SD 2.x ViT-H).

    Raises:
        CheckpointError: a key is not part of the OpenCLIP text tower, names a
            block ``>= num_layers``, or a fused ``in_proj`` is not divisible by 3.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in sd.items():
        if key in OPENCLIP_DROPPED_KEYS:
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = tensor
            continue
        m = _RESBLOCK.match(key)
        if m is None or int(m.group(1)) >= num_layers:
            unexpected.append(key)
            continue
        index, in_proj, name, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        prefix = f"text_model.encoder.layers.{index}."
        if in_proj:
            if tensor.shape[0] % 3:
                raise CheckpointError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3 (q | k | v)")
            for part, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk
        elif name in _BLOCK:
            out[f"{prefix}{_BLOCK[name]}.{kind}"] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError("not an OpenCLIP text tower", unexpected=sorted(unexpected))
    return out


def clip_to_openclip_state_dict(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_to_clip_state_dict` (q/k/v fused back into ``in_proj``).

    Used by tests to fabricate SD 2.x style checkpoints; ``text_projection`` and
    ``logit_scale`` are not produced.
    """
    top_inverse = {v: k for k, v in _TOP_LEVEL.items()}
    block_inverse = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in sd.items():
        if key in top_inverse:
            out[top_inverse[key]] = tensor
            continue
        m = _OURS_LAYER.match(key)
        if m is None or int(m.group(1)) >= num_layers:
            unexpected.append(key)
            continue
        index, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((index, kind), {})[name[len("self_attn.")]] = tensor
        elif name in block_inverse:
            out[f"transformer.resblocks.{index}.{block_inverse[name]}.{kind}"] = tensor
        else:
            unexpected.append(key)
    for (index, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"layer {index} lacks {', '.join(missing)} projection {kind}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
    if unexpected:
        raise CheckpointError("not a CLIPTextEncoder state dict", unexpected=sorted(unexpected))
    return out
