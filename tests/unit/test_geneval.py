"""The miniature GenEval harness, graded against oracle and broken "models" (no diffusion model needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from ldm.data.geneval import (
    EVAL_INPAINT_SEED,
    InpaintCase,
    eval_prompts,
    evaluate,
    inpaint_cases,
    masked_psnr,
)
from ldm.data.shapes import (
    COLOUR_RGB,
    IMAGE_SIZE,
    Placement,
    SceneSpec,
    object_box,
    parse_caption,
    render,
    render_placements,
    sample_scene,
    scene_rng,
)


def test_prompts_are_fixed_and_balanced() -> None:
    prompts = eval_prompts(10)
    assert prompts == eval_prompts(10)
    assert [len(p.objects) for p in prompts] == [1] * 5 + [2] * 5
    assert eval_prompts(10, seed=1) != prompts


def test_inpaint_cases_replace_one_object_by_a_different_one() -> None:
    cases = inpaint_cases(12)
    for case in cases:
        old = case.source.objects[case.replaced]
        new = case.target.objects[case.replaced]
        other = case.target.objects[1 - case.replaced]
        assert new.shape != old.shape and new.colour != old.colour
        assert (new.size, new.position) == (old.size, old.position)
        assert (new.shape, new.colour) != (other.shape, other.colour)
        assert other == case.source.objects[1 - case.replaced]
        assert parse_caption(case.prompt) == case.target
        mask = np.asarray(case.mask)
        assert set(np.unique(mask)) == {0, 255}
        # the masked box holds the old object: the image differs from the background there
        assert np.asarray(case.image)[mask == 255].std() > 10


def test_masked_psnr() -> None:
    a = Image.new("RGB", (4, 4), (100, 100, 100))
    b = a.copy()
    keep = np.ones((4, 4), bool)
    assert masked_psnr(a, b, keep) == math.inf
    b.putpixel((0, 0), (110, 100, 100))
    assert masked_psnr(a, b, keep) == pytest.approx(10 * math.log10(255**2 / (100 / 48)))
    keep[0, 0] = False
    assert masked_psnr(a, b, keep) == math.inf


def _oracle_generate(prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> list[Image.Image]:
    """A perfect "model": renders each prompt (guidance ignored)."""
    return [render(parse_caption(p), scene_rng(99, s)) for p, s in zip(prompts, seeds, strict=True)]


def _blank_generate(prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> list[Image.Image]:
    return [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128)) for _ in prompts]


def _oracle_inpaint(
    cases: Sequence[InpaintCase], seeds: Sequence[int], guidance: float
) -> tuple[list[Image.Image], list[Image.Image]]:
    """Redraws the scene with the target object in the old one's place."""
    out = []
    for i, case in enumerate(cases):
        scene = sample_scene(scene_rng(EVAL_INPAINT_SEED, i), num_objects=2)  # the case's own source scene
        placements = list(scene.placements)
        new = case.target.objects[case.replaced]
        old = placements[case.replaced]
        placements[case.replaced] = Placement(new.shape, old.cx, old.cy, old.radius, 0.0, COLOUR_RGB[new.colour])
        drawn = render_placements(scene.background_rgb, placements)
        keep = case.mask.point(lambda v: 255 if v < 128 else 0)
        out.append(Image.composite(case.image, drawn, keep))
    return out, out


def test_oracle_model_scores_high_and_blank_model_scores_zero() -> None:
    good = evaluate(_oracle_generate, _oracle_inpaint, prompts=40, guidance_scales=(5.0,), inpaint_count=10, real_count=100)
    t2i = good["text2img"]["5"]  # type: ignore[index]
    assert t2i["single_shape_colour"] >= 0.9
    assert t2i["two_objects"] >= 0.85
    assert t2i["background"] >= 0.95
    assert good["judge_on_real"]["all"] >= 0.95  # type: ignore[index]
    inp = good["inpaint"]  # type: ignore[index]
    assert inp["new_object"] >= 0.8 and inp["other_object_kept"] >= 0.8
    assert inp["unmasked_psnr_returned_min_db"] == "inf"
    # the oracle's images come from the real distribution: its distance is near the real-vs-real floor
    assert t2i["frechet_vs_real"] < 3 * good["frechet_real_vs_real"] + 1.0  # type: ignore[operator]

    bad = evaluate(_blank_generate, None, prompts=40, guidance_scales=(1.0,), inpaint_count=0, real_count=100)
    b = bad["text2img"]["1"]  # type: ignore[index]
    assert b["single_shape_colour"] == 0.0 and b["two_objects"] == 0.0
    assert b["frechet_vs_real"] > 10 * t2i["frechet_vs_real"]
    assert "inpaint" not in bad


def test_zero_counts_skip_their_part() -> None:
    """``prompts=0`` / ``real_count=0`` run the inpainting part alone (the eval tool's ``--prompts 0 --real 0``)."""

    def never(prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> list[Image.Image]:
        raise AssertionError("text-to-image must not run with prompts=0")

    only = evaluate(never, _oracle_inpaint, prompts=0, inpaint_count=4, real_count=0)
    assert set(only) == {"inpaint"}
    assert only["inpaint"]["cases"] == 4 and only["inpaint"]["new_object"] >= 0.75  # type: ignore[index]


def test_case_box_is_the_replaced_objects_box() -> None:
    case = inpaint_cases(1)[0]
    scene = sample_scene(scene_rng(EVAL_INPAINT_SEED, 0), num_objects=2)
    assert scene.spec == case.source
    x0, y0, x1, y1 = object_box(scene.placements[case.replaced], 2.0)
    mask = np.asarray(case.mask)
    assert mask[y0:y1, x0:x1].min() == 255 and mask.sum() == 255 * (x1 - x0) * (y1 - y0)
    assert isinstance(case.source, SceneSpec)
