"""The continuous-batching engine on a tiny real model: images equal the same requests run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.engine.admission import AdmissionConfig
from ldm.engine.engine import ContinuousBatchEngine, estimate_unet_row_bytes
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from tests.unit.test_pipeline import box_mask, scene

SIZE = 32


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    pipe = load_pipeline(write_random_model(tmp_path_factory.mktemp("random")))
    assert pipe.batch_invariant and pipe.inpaint_mode == "blend"  # CPU default; blend inpainting
    return pipe


def pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


@pytest.mark.slow
def test_images_equal_each_request_alone_while_rows_join_and_leave(pipe: LatentDiffusionPipeline) -> None:
    groups = {
        "target": [GenerationRow("a red cat", seed=11, negative_prompt="dog", steps=10, guidance_scale=5.0)],
        "moon": [GenerationRow("the moon at night", seed=3, steps=20, guidance_scale=7.5, eta=0.5)],
        "plain": [GenerationRow("blue house", seed=99, steps=4, guidance_scale=1.0)],
        "inpaint": [GenerationRow("a red circle", seed=5, steps=6, guidance_scale=3.0, eta=0.3,
                                  image=scene(SIZE), mask=box_mask(SIZE))],
        "pair": [GenerationRow("two", seed=7, steps=5, guidance_scale=2.0, eta=1.0),
                 GenerationRow("two", seed=8, steps=5, guidance_scale=2.0, eta=1.0)],
        "gone": [GenerationRow("canceled half-way", seed=21, steps=10, guidance_scale=4.0)],
        "img2img": [GenerationRow("a blue square", seed=9, steps=10, guidance_scale=3.0, image=scene(SIZE, 4),
                                  strength=0.6)],
    }
    arrivals = {0: ["target", "moon"], 1: ["gone"], 2: ["plain"], 3: ["img2img"], 4: ["inpaint"], 8: ["pair"]}
    engine = ContinuousBatchEngine(pipe, AdmissionConfig(max_rows=8))
    images: dict[tuple[str, int], torch.Tensor] = {}
    rows_per_step = []
    for n in range(60):
        for g in arrivals.get(n, []):
            engine.add(g, groups[g], SIZE, SIZE)
        if n == 5:
            assert engine.cancel("gone")
        if engine.idle and n > 8:
            break
        rep = engine.step()
        assert rep.failed == ()
        rows_per_step.append(rep.rows)
        images.update({(im.group, im.index): pixels(im.image) for im in rep.images})
    assert len(set(rows_per_step)) > 2  # the batch really changed shape while "target" ran
    assert ("gone", 0) not in images
    for g, rows in groups.items():
        if g == "gone":
            continue
        for i, row in enumerate(rows):
            reference = pipe.generate([row], SIZE, SIZE)[0]
            assert torch.equal(images[(g, i)], pixels(reference)), f"{g}[{i}] differs from the request alone"


def test_memory_estimate_grows_with_size_and_attention(pipe: LatentDiffusionPipeline) -> None:
    small = estimate_unet_row_bytes(pipe, SIZE, SIZE)
    big = estimate_unet_row_bytes(pipe, 2 * SIZE, 2 * SIZE)
    assert 0 < small < big
    assert big >= 4 * small  # at least linear in the pixel count
