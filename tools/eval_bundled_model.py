"""Evaluate the bundled text-to-image model with the miniature GenEval of :mod:`ldm.data.geneval`.

Usage::

    python tools/eval_bundled_model.py                         # full run: 200 prompts x (1.0, 5.0), 100 inpaintings
    python tools/eval_bundled_model.py --prompts 8 --inpaint 4 --real 200   # a quick subset
    python tools/eval_bundled_model.py --json out.json --write-docs          # also update the model card + benchmarks

The model is loaded through the public loader (:func:`ldm.pipeline.load_pipeline`),
exactly as the server loads it, and sampled with DDIM (25 steps by default,
``eta = 0``). Image ``i`` of every guidance scale uses seed ``i``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ldm.data.geneval import InpaintCase, evaluate
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm_serve.models import bundled_model_path

ROOT = Path(__file__).resolve().parent.parent
DOC_START, DOC_END = "<!-- bundled-eval:start -->", "<!-- bundled-eval:end -->"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--prompts", type=int, default=200, help="text-to-image prompts (half 1 object, half 2; 0 = skip)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0], help="guidance scales to compare")
    p.add_argument("--inpaint", type=int, default=100, help="inpainting cases (0 = skip)")
    p.add_argument("--inpaint-guidance", type=float, default=5.0)
    p.add_argument("--real", type=int, default=1000, help="real held-out scenes to grade the judge on (0 = skip)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--batch", type=int, default=8, help="rows per pipeline.generate call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--write-docs", action="store_true", help="put the report into MODEL_CARD.md and docs/benchmarks.md")
    return p.parse_args(argv)


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def make_generate(pipe: LatentDiffusionPipeline, steps: int, batch: int):  # noqa: ANN201 - see ldm.data.geneval.Generate
    """The text-to-image callable of :func:`ldm.data.geneval.evaluate` for ``pipe``."""

    def generate(prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> list[Image.Image]:
        images: list[Image.Image] = []
        for idx in _chunks(len(prompts), batch):
            rows = [GenerationRow(prompts[i], seeds[i], "", steps, guidance, 0.0) for i in idx]
            out = pipe.generate(rows, pipe.default_size, pipe.default_size)
            images.extend(im for im in out if im is not None)
        return images

    return generate


def make_inpaint(pipe: LatentDiffusionPipeline, steps: int, batch: int):  # noqa: ANN201 - see ldm.data.geneval.Inpaint
    """The inpainting callable: returns (images as the server returns them, raw decoder outputs)."""

    def inpaint(
        cases: Sequence[InpaintCase], seeds: Sequence[int], guidance: float
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        returned: list[Image.Image] = []
        raw: list[Image.Image] = []
        for idx in _chunks(len(cases), batch):
            rows = [
                GenerationRow(
                    cases[i].prompt, seeds[i], "", steps, guidance, 0.0, image=cases[i].image, mask=cases[i].mask
                )
                for i in idx
            ]
            size = cases[idx[0]].image.size
            latents, _ = pipe.generate_latents(rows, size[0], size[1])
            decoded = pipe.decode_latents(latents)
            for i, img in zip(idx, decoded, strict=True):
                raw.append(img)
                # the pipeline's paste-back: source pixels wherever the mask says keep
                keep = cases[i].mask.point(lambda v: 255 if v < 128 else 0)
                returned.append(Image.composite(cases[i].image.convert("RGB"), img, keep))
        return returned, raw

    return inpaint


def _markdown(report: dict[str, object], model: Path, args: argparse.Namespace) -> str:
    """The report as the Markdown block of the model card; parts that were skipped (0 cases) are left out."""
    lines = _text2img_markdown(report, model, args) + _judge_markdown(report) + _inpaint_markdown(report)
    return "\n".join(lines).strip("\n")


def _text2img_markdown(report: dict[str, object], model: Path, args: argparse.Namespace) -> list[str]:
    t2i = report.get("text2img")
    if not isinstance(t2i, dict):
        return []
    lines = [
        f"Model `{model.name}`; {args.prompts} held-out prompts ({args.prompts // 2} with one object, "
        f"{args.prompts - args.prompts // 2} with two), {args.steps} DDIM steps, eta 0, seed = prompt index; "
        f"command: `python tools/eval_bundled_model.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
        "| guidance | single: shape+colour | single: position | two objects right | background | size | everything | Frechet (judge space) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scale, e in t2i.items():
        lines.append(
            f"| {scale} | {e['single_shape_colour']:.1%} | {e['single_position']:.1%} | {e['two_objects']:.1%} | "
            f"{e['background']:.1%} | {e['size']:.1%} | {e['all']:.1%} | {e['frechet_vs_real']} | {e['seconds']} |"
        )
    lines.append(
        f"| real scenes | | | | | | | {report['frechet_real_vs_real']} (two real sets, same N: the floor) | |"
    )
    return lines


def _judge_markdown(report: dict[str, object]) -> list[str]:
    judge = report.get("judge_on_real")
    if not isinstance(judge, dict):
        return []
    return [
        "",
        f"Judge on {int(judge['scenes'])} real held-out scenes: everything right {judge['all']:.2%}, "
        f"background {judge['background']:.2%}, shape {judge['shape']:.2%}, colour {judge['colour']:.2%}, "
        f"position {judge['position']:.2%}, size {judge['size']:.2%}.",
    ]


def _inpaint_markdown(report: dict[str, object]) -> list[str]:
    inp = report.get("inpaint")
    if not isinstance(inp, dict):
        return []
    return [
        "",
        f"Inpainting ({inp['cases']} held-out two-object scenes, one object's box masked, prompt asks for a "
        f"different shape and colour there, guidance {inp['guidance']}): new object right {inp['new_object']:.1%}, "
        f"other object kept {inp['other_object_kept']:.1%}; unmasked-region PSNR of the returned image "
        f"(known pixels pasted back): min {inp['unmasked_psnr_returned_min_db']} dB; of the raw decoder output "
        f"before the paste: mean {inp['unmasked_psnr_raw_mean_db']} dB, min {inp['unmasked_psnr_raw_min_db']} dB; "
        f"{inp['seconds']} s.",
    ]


def _replace_between(path: Path, body: str, heading: str) -> None:
    text = path.read_text() if path.is_file() else ""
    block = f"{DOC_START}\n{body}\n{DOC_END}"
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_docs and min(args.prompts, args.real, args.inpaint) <= 0:
        print("--write-docs needs the whole evaluation (--prompts, --real and --inpaint above 0)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path()
    if model is None:
        print("no bundled model found; pass --model", file=sys.stderr)
        return 2
    pipe = load_pipeline(model)
    start = time.perf_counter()
    report = evaluate(
        make_generate(pipe, args.steps, args.batch),
        make_inpaint(pipe, args.steps, args.batch),
        prompts=args.prompts,
        guidance_scales=args.guidance,
        inpaint_count=args.inpaint,
        inpaint_guidance=args.inpaint_guidance,
        real_count=args.real,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    report["model"] = str(model)
    report["steps"] = args.steps
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["threads"] = torch.get_num_threads()
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    if args.write_docs:
        body = _markdown(report, Path(model), args)
        card = Path(model).parent / "MODEL_CARD.md"
        _replace_between(card, body, "## Evaluation")
        _replace_between(ROOT / "docs" / "benchmarks.md", body, "## Bundled model: miniature GenEval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
