"""``ldm-serve generate | img2img | inpaint | export-onnx``: a model in-process, no queue.

Heavy imports (torch) happen inside the subcommands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ldm_serve.limits import STRENGTH_DEFAULT


def _resolve_checkpoint(arg: str | None) -> tuple[Path, bool]:
    """(checkpoint path, is_fallback_random_model)."""
    if arg:
        return Path(arg), False
    from worker.default_model import default_model

    model = default_model()
    return model.path, model.untrained


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "--model", dest="checkpoint", help="checkpoint file or diffusers folder "
                   "(default: the bundled model)")
    p.add_argument("--config", help="original YAML config (default: <checkpoint>.yaml beside it, or inferred)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    p.add_argument("--text-encoder", help="text encoder of a checkpoint pruned of it: a diffusers "
                   "text_encoder/ folder or a file of cond_stage_model.* weights")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use model_ema.* weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed + i)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", "--scale", dest="guidance_scale", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--out", required=True, help="output PNG path; with --n > 1, '-<i>' is added before the suffix")


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns a pipeline, torch imported lazily
    from ldm_serve.cpu_threads import quiet_openmp_for_core_workers

    quiet_openmp_for_core_workers(args.device, None)  # before torch loads
    import torch

    from ldm.pipeline import load_pipeline

    path, fallback = _resolve_checkpoint(args.checkpoint)
    if fallback:
        print("WARNING: no trained model is installed; using a tiny RANDOM, UNTRAINED model "
              "(outputs are noise)", file=sys.stderr)
    return load_pipeline(
        path,
        args.config,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        use_ema=args.ema,
        tokenizer_dir=args.tokenizer,
        text_encoder=args.text_encoder,
    )


def _save(images: list, seeds: list[int], out: str) -> None:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    for i, (img, seed) in enumerate(zip(images, seeds, strict=True)):
        path = target if len(images) == 1 else target.with_name(f"{target.stem}-{i}{target.suffix}")
        img.save(path)
        print(f"{path}  seed={seed}")


def _cmd_generate(args: argparse.Namespace) -> int:
    pipe = _load(args)
    t0 = time.perf_counter()
    result = pipe.txt2img(
        args.prompt,
        args.negative_prompt,
        num_images=args.n,
        seeds=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        width=args.width,
        height=args.height,
    )
    _save(result.images, result.seeds, args.out)
    print(f"{len(result.images)} image(s) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


def _cmd_inpaint(args: argparse.Namespace) -> int:
    from PIL import Image

    pipe = _load(args)
    image = Image.open(args.image)
    mask = Image.open(args.mask)
    result = pipe.inpaint(
        image,
        mask,
        args.prompt,
        args.negative_prompt,
        num_images=args.n,
        seeds=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
    )
    _save(result.images, result.seeds, args.out)
    return 0


def _cmd_img2img(args: argparse.Namespace) -> int:
    from PIL import Image

    from service.images import fit_image

    image = Image.open(args.image)
    image = fit_image(image, args.width or image.size[0], args.height or image.size[1])
    pipe = _load(args)
    t0 = time.perf_counter()
    result = pipe.img2img(
        image,
        args.prompt,
        args.negative_prompt,
        strength=args.strength,
        num_images=args.n,
        seeds=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
    )
    _save(result.images, result.seeds, args.out)
    print(f"{len(result.images)} image(s) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export the UNet and decoder to ONNX (for trtexec; docs/tensorrt.md)."""
    from ldm.backends.onnx_export import check_pipeline_onnx, export_pipeline_onnx  # lazy: imports torch

    pipe = _load(args)
    paths = export_pipeline_onnx(
        pipe, args.out, width=args.width, height=args.height, exporter=args.exporter, opset=args.opset,
        keyed=False,
    )  # fmt: skip
    for path in (paths.unet, paths.decoder, paths.meta):
        print(path)
    if args.check:
        for part, err in check_pipeline_onnx(pipe, paths).items():
            print(f"{part}: onnxruntime vs eager, max relative error {err:.2e}")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``generate``, ``img2img``, ``inpaint`` and ``export-onnx`` to the ``ldm-serve`` parser."""
    gen = sub.add_parser("generate", help="text-to-image in-process, written to PNG files")
    _add_model_args(gen)
    gen.add_argument("--width", type=int, default=None, help="default: the model's training size")
    gen.add_argument("--height", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)

    i2i = sub.add_parser("img2img", help="image-to-image (SDEdit) from an init image, in-process")
    _add_model_args(i2i)
    i2i.add_argument("--image", required=True, help="init image (PNG / JPEG / WebP)")
    i2i.add_argument("--strength", type=float, default=STRENGTH_DEFAULT,
                     help="in (0, 1]: int(steps * strength) steps run from the image noised to that level")
    i2i.add_argument("--width", type=int, default=None,
                     help="default: the image's width; another size scales the image to cover and centre-crops")
    i2i.add_argument("--height", type=int, default=None, help="default: the image's height")
    i2i.set_defaults(func=_cmd_img2img)

    inp = sub.add_parser("inpaint", help="repaint the white part of a mask, in-process")
    _add_model_args(inp)
    inp.add_argument("--image", required=True)
    inp.add_argument("--mask", required=True, help="white = repaint; same size as the image")
    inp.set_defaults(func=_cmd_inpaint)

    onnx = sub.add_parser("export-onnx", help="export the UNet and decoder to ONNX (for TensorRT's trtexec)")
    onnx.add_argument("--model", "--checkpoint", dest="checkpoint", help="checkpoint file or diffusers folder "
                      "(default: the bundled model)")
    onnx.add_argument("--config", help="original YAML config (default: beside the checkpoint, or inferred)")
    onnx.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    onnx.add_argument("--text-encoder", help="text encoder of a checkpoint pruned of it (see generate)")
    onnx.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use model_ema.* weights")
    onnx.add_argument("--device", default="cpu")
    onnx.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    onnx.add_argument("--out", required=True, help="folder for unet.onnx, decoder.onnx and model.json")
    onnx.add_argument("--width", type=int, default=None, help="image width the files are for (default: the model's)")
    onnx.add_argument("--height", type=int, default=None)
    onnx.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    onnx.add_argument("--opset", type=int, default=None)
    onnx.add_argument("--check", action="store_true", help="run both files with onnxruntime and compare with eager")
    onnx.set_defaults(func=_cmd_export_onnx)
