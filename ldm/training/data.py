"""Deterministic training batches and per-step random generators.

Every random draw of a training step comes from a generator derived from
``(seed, stage, step)`` alone, and the scenes of step ``s`` are scenes
``s * B .. s * B + B - 1`` of the data stream ``data_seed``
(:func:`ldm.data.shapes.scene_rng`). A run therefore needs no saved RNG state
to resume: step ``s`` draws the same data and noise whether or not the run was
interrupted before it.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.data.shapes import Scene, sample_scene, scene_rng

__all__ = ["STAGES", "images_to_tensor", "mixed_scene_batch", "random_crops", "scene_batch", "step_generator"]

STAGES: dict[str, int] = {"autoencoder": 1, "diffusion": 2, "init": 3, "eval": 4, "decoder": 5}
"""Stage ids mixed into the per-step seeds, so the two stages never share noise."""


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """CPU generator for one training step of one stage, a pure function of its arguments."""
    state = np.random.SeedSequence([int(seed), STAGES[stage], int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in ``[-1, 1]`` (the autoencoder's range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batch(scenes: list[Scene]) -> tuple[torch.Tensor, list[str]]:
    images = np.stack([np.asarray(s.image, dtype=np.uint8) for s in scenes])  # [N, 64, 64, 3]
    return images_to_tensor(images), [s.caption for s in scenes]


def scene_batch(data_seed: int, start: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes ``start .. start + count - 1`` of stream ``data_seed``: images ``[count, 3, 64, 64]`` and captions."""
    return _batch([sample_scene(scene_rng(data_seed, i)) for i in range(start, start + count)])


def mixed_scene_batch(
    data_seed: int, start: int, count: int, two_object_prob: float
) -> tuple[torch.Tensor, list[str]]:
    """Like :func:`scene_batch`, but scene ``i`` has two objects with probability ``two_object_prob``.

    Scene ``i``'s generator first draws the object count (one uniform number), then
    the scene, so the stream stays a pure function of ``(data_seed, i)``.
    """
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    scenes = []
    for i in range(start, start + count):
        rng = scene_rng(data_seed, i)
        scenes.append(sample_scene(rng, num_objects=2 if rng.random() < two_object_prob else 1))
    return _batch(scenes)


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator, multiple: int = 1) -> torch.Tensor:
    """One ``size x size`` crop per image of ``x`` ``[N, C, H, W]``, offsets multiples of ``multiple``.

    Aligning the offsets to the autoencoder's factor keeps a crop's latent grid on
    the full image's grid. ``size >= H`` returns ``x`` unchanged.
    """
    n, _, h, w = x.shape
    if size >= min(h, w):
        return x
    slots_y, slots_x = (h - size) // multiple + 1, (w - size) // multiple + 1
    ys = torch.randint(0, slots_y, (n,), generator=generator) * multiple
    xs = torch.randint(0, slots_x, (n,), generator=generator) * multiple
    offsets = zip(ys.tolist(), xs.tolist(), strict=True)
    return torch.stack([x[i, :, y : y + size, c : c + size] for i, (y, c) in enumerate(offsets)])

