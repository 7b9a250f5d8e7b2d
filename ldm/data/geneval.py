"""A miniature GenEval for models of :mod:`ldm.data.shapes` scenes, graded by the judge.

Three parts, all on held-out material (a scene stream no training run reads):

* **text-to-image**: a fixed, balanced set of prompts (half one object, half
  two objects), one image per prompt and seed, at each guidance scale. The judge
  (:mod:`ldm.data.judge`) reads every image and :func:`~ldm.data.shapes.scene_matches`
  compares it with the prompt. Headline numbers:

  - ``single_shape_colour``: one-object prompts whose object has the right shape
    and colour (in the right cell);
  - ``two_objects``: two-object prompts with both objects right in shape, colour
    and relative position (``objects`` of :func:`scene_matches`);
  - ``background``: the background colour right, over all prompts.

* **inpainting**: a held-out two-object scene; one object's box is masked and the
  prompt asks for a different shape and colour there (same size, same place).
  Graded: the judge reads the new object in that cell (``new_object``), and the
  PSNR of the unmasked pixels against the input, both for the returned image
  (known pixels pasted back, as the server returns it) and for the raw decoder
  output before the paste, which shows how much the generated part disturbs its
  surroundings.

* **Frechet distance** in the judge's feature space between generated images and
  real scenes of the same prompts (equal N), next to the distance between two
  independent real sets of the same prompts (the floor at this N).

The judge's own accuracy on real held-out scenes is reported too, so the grader
is known to be fair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm.data.judge import (
    accuracy_report,
    frechet_distance,
    judge_features,
    judge_scenes,
    load_judge,
    scene_batch,
)
from ldm.data.shapes import (
    COLOURS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    caption,
    object_box,
    render,
    sample_scene,
    sample_spec,
    scene_matches,
    scene_rng,
)

__all__ = [
    "EVAL_INPAINT_SEED",
    "EVAL_PROMPT_SEED",
    "EVAL_REAL_SEED",
    "InpaintCase",
    "eval_prompts",
    "evaluate",
    "inpaint_cases",
    "masked_psnr",
    "real_scenes_for",
]

EVAL_PROMPT_SEED = 20_221_101
"""Stream of the evaluation prompts (training reads stream 7; the run's held-out PSNR reads 1_000_010)."""
EVAL_REAL_SEED = 20_221_102
"""Stream of the real scenes: judge accuracy and the reference sets of the Frechet distance."""
EVAL_INPAINT_SEED = 20_221_103
"""Stream of the inpainting source scenes."""

Generate = Callable[[Sequence[str], Sequence[int], float], list[Image.Image]]
"""``(prompts, seeds, guidance) -> images``: one image per prompt (the model under test)."""
Inpaint = Callable[[Sequence["InpaintCase"], Sequence[int], float], tuple[list[Image.Image], list[Image.Image]]]
"""``(cases, seeds, guidance) -> (returned images, raw decoder outputs before the paste-back)``."""


def eval_prompts(count: int, seed: int = EVAL_PROMPT_SEED) -> list[SceneSpec]:
    """``count`` prompts: the first ``count // 2`` with one object, the rest with two (fixed per seed)."""
    singles = count // 2
    return [
        sample_spec(scene_rng(seed, i), num_objects=1 if i < singles else 2) for i in range(count)
    ]


def real_scenes_for(specs: Sequence[SceneSpec], seed: int) -> np.ndarray:
    """One jittered rendering per spec (uint8 ``[N, 64, 64, 3]``), placement noise from stream ``seed``."""
    return np.stack([np.asarray(render(spec, scene_rng(seed, i))) for i, spec in enumerate(specs)])


@dataclass(frozen=True)
class InpaintCase:
    """One inpainting task: repaint ``box`` of ``image`` so that it shows ``target``'s object there.

    Attributes:
        image: the source scene (64x64 RGB).
        mask: L image, 255 = repaint (the replaced object's box), 0 = keep.
        source: the source scene's spec.
        target: the spec the prompt describes (the source with one object replaced).
        replaced: index of the replaced object in ``target.objects``.
    """

    image: Image.Image
    mask: Image.Image
    source: SceneSpec
    target: SceneSpec
    replaced: int

    @property
    def prompt(self) -> str:
        return caption(self.target)


def inpaint_cases(count: int, seed: int = EVAL_INPAINT_SEED, margin: float = 2.0) -> list[InpaintCase]:
    """``count`` held-out two-object scenes, each with one object to replace by a different shape and colour.

    The new object keeps the old one's size and cell, and differs from it in both
    shape and colour; it also differs from the other object in (shape, colour),
    so that the two stay distinguishable.
    """
    cases = []
    for i in range(count):
        rng = scene_rng(seed, i)
        scene = sample_scene(rng, num_objects=2)
        spec, placements, image = scene.spec, scene.placements, scene.image
        k = int(rng.integers(2))
        old, other = spec.objects[k], spec.objects[1 - k]
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = COLOURS[rng.integers(len(COLOURS))]
            if shape != old.shape and colour != old.colour and (shape, colour) != (other.shape, other.colour):
                break
        new = ObjectSpec(shape=shape, colour=colour, size=old.size, position=old.position)
        objects = list(spec.objects)
        objects[k] = new
        target = SceneSpec(tuple(objects), spec.background, spec.relation)
        mask = Image.new("L", image.size, 0)
        x0, y0, x1, y1 = object_box(placements[k], margin)
        mask.paste(255, (x0, y0, x1, y1))
        cases.append(InpaintCase(image=image, mask=mask, source=spec, target=target, replaced=k))
    return cases


def masked_psnr(a: Image.Image, b: Image.Image, keep: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) between ``a`` and ``b`` over the pixels where ``keep`` is true; ``inf`` if equal."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)[keep]
    y = np.asarray(b.convert("RGB"), dtype=np.float64)[keep]
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _text2img_report(specs: Sequence[SceneSpec], judged: Sequence[SceneSpec]) -> dict[str, float]:
    rows = [scene_matches(want, got) for want, got in zip(specs, judged, strict=True)]
    singles = [r for r, s in zip(rows, specs, strict=True) if len(s.objects) == 1]
    doubles = [r for r, s in zip(rows, specs, strict=True) if len(s.objects) == 2]
    report = {
        "single_shape_colour": float(np.mean([r["shape"] and r["colour"] for r in singles])) if singles else math.nan,
        "single_position": float(np.mean([r["position"] for r in singles])) if singles else math.nan,
        "two_objects": float(np.mean([r["objects"] for r in doubles])) if doubles else math.nan,
        "background": float(np.mean([r["background"] for r in rows])),
        "size": float(np.mean([r["size"] for r in rows])),
        "all": float(np.mean([r["all"] for r in rows])),
        "prompts_single": float(len(singles)),
        "prompts_two": float(len(doubles)),
    }
    return report


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def evaluate(
    generate: Generate,
    inpaint: Inpaint | None,
    *,
    prompts: int = 200,
    guidance_scales: Sequence[float] = (1.0, 5.0),
    inpaint_count: int = 100,
    inpaint_guidance: float = 5.0,
    real_count: int = 1000,
    seed_offset: int = 0,
    log: Callable[[str], None] = lambda _line: None,
) -> dict[str, object]:
    """Run the whole evaluation against ``generate`` / ``inpaint``; returns a JSON-able report.

    Image ``i`` of each guidance scale uses seed ``seed_offset + i``, so scales are
    compared on the same starting noise.
    """
    judge = load_judge()
    report: dict[str, object] = {}

    if real_count > 0:  # the judge on real held-out scenes (its fairness); 0 = skip
        real_images, real_specs = scene_batch(EVAL_REAL_SEED, 0, real_count)
        judge_report = accuracy_report(real_specs, judge_scenes(real_images, judge))
        report["judge_on_real"] = {k: round(v, 4) for k, v in judge_report.items()}
        log(f"judge on {real_count} real held-out scenes: all {judge_report['all']:.4f}")
    if prompts > 0:  # 0 = skip the text-to-image part
        report.update(_text2img_part(generate, judge, prompts, guidance_scales, seed_offset, log))
    if inpaint is not None and inpaint_count > 0:
        report["inpaint"] = _inpaint_part(inpaint, judge, inpaint_count, inpaint_guidance, seed_offset)
        log(f"inpainting: {report['inpaint']}")
    return report


def _text2img_part(
    generate: Generate,
    judge: object,
    prompts: int,
    guidance_scales: Sequence[float],
    seed_offset: int,
    log: Callable[[str], None],
) -> dict[str, object]:
    """The text-to-image part of :func:`evaluate`: ``frechet_real_vs_real`` and ``text2img``."""
    report: dict[str, object] = {}
    specs = eval_prompts(prompts)
    captions = [caption(s) for s in specs]
    seeds = [seed_offset + i for i in range(len(specs))]
    reference = real_scenes_for(specs, EVAL_REAL_SEED + 1)
    reference_feats = judge_features(reference, judge)
    floor_feats = judge_features(real_scenes_for(specs, EVAL_REAL_SEED + 2), judge)
    report["frechet_real_vs_real"] = round(frechet_distance(reference_feats, floor_feats), 3)

    per_scale: dict[str, object] = {}
    for scale in guidance_scales:
        start = time.perf_counter()
        images = generate(captions, seeds, float(scale))
        elapsed = time.perf_counter() - start
        judged = judge_scenes(images, judge)
        entry: dict[str, object] = {k: round(v, 4) for k, v in _text2img_report(specs, judged).items()}
        entry["frechet_vs_real"] = round(frechet_distance(judge_features(images, judge), reference_feats), 3)
        entry["seconds"] = round(elapsed, 1)
        per_scale[f"{float(scale):g}"] = entry
        log(f"guidance {scale:g}: {entry}")
    report["text2img"] = per_scale
    return report


def _inpaint_part(
    inpaint: Inpaint, judge: object, inpaint_count: int, inpaint_guidance: float, seed_offset: int
) -> dict[str, object]:
    """The inpainting part of :func:`evaluate` (see the module docstring)."""
    cases = inpaint_cases(inpaint_count)
    case_seeds = [seed_offset + i for i in range(len(cases))]
    start = time.perf_counter()
    returned, raw = inpaint(cases, case_seeds, inpaint_guidance)
    elapsed = time.perf_counter() - start
    judged = judge_scenes(returned, judge)
    new_right, other_kept, psnr_out, psnr_raw = [], [], [], []
    for case, got, out_img, raw_img in zip(cases, judged, returned, raw, strict=True):
        cells = got.cells()
        new = case.target.objects[case.replaced]
        other = case.target.objects[1 - case.replaced]
        seen = cells.get(new.position)
        new_right.append(seen is not None and (seen.shape, seen.colour) == (new.shape, new.colour))
        kept = cells.get(other.position)
        other_kept.append(kept is not None and (kept.shape, kept.colour) == (other.shape, other.colour))
        keep = np.asarray(case.mask) < 128
        psnr_out.append(masked_psnr(out_img, case.image, keep))
        psnr_raw.append(masked_psnr(raw_img, case.image, keep))
    finite_raw = [p for p in psnr_raw if math.isfinite(p)]
    return {
        "cases": len(cases),
        "guidance": inpaint_guidance,
        "new_object": round(float(np.mean(new_right)), 4),
        "other_object_kept": round(float(np.mean(other_kept)), 4),
        "unmasked_psnr_returned_min_db": _finite(min(psnr_out)),
        "unmasked_psnr_raw_mean_db": round(float(np.mean(finite_raw)), 2) if finite_raw else "inf",
        "unmasked_psnr_raw_min_db": _finite(round(min(psnr_raw), 2)),
        "seconds": round(elapsed, 1),
    }
