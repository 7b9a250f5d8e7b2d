"""Training and evaluation data of the bundled model (numpy + Pillow only; no torch here).

:mod:`ldm.data.shapes` generates captioned scenes; :mod:`ldm.data.judge` (imports
torch, so it is not re-exported) holds the attribute classifier that grades images.
"""

from __future__ import annotations

from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    VOCAB_WORDS,
    ObjectSpec,
    Placement,
    Scene,
    SceneSpec,
    caption,
    parse_caption,
    render,
    sample_scene,
    sample_spec,
    scene_matches,
    scene_rng,
    write_vocab,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "VOCAB_WORDS",
    "ObjectSpec",
    "Placement",
    "Scene",
    "SceneSpec",
    "caption",
    "parse_caption",
    "render",
    "sample_scene",
    "sample_spec",
    "scene_matches",
    "scene_rng",
    "write_vocab",
]
