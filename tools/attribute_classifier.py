"""Train and evaluate the scene judge (the attribute classifier of :mod:`ldm.data.judge`).

Training streams fresh procedural scenes (stream ``--train-seed``, scene ``i``
used once); evaluation uses other seeds, so every reported figure is on
held-out scenes. CPU only; one thread by default because the machine is shared.

    python tools/attribute_classifier.py train            # writes tools/judge/judge.safetensors
    python tools/attribute_classifier.py eval --scenes 2000 --seed 1

The eval subcommand prints one line per :func:`ldm.data.shapes.scene_matches`
criterion: the fraction of held-out scenes where the judge got it right.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data.judge import (
    DEFAULT_WEIGHTS,
    IGNORE,
    SceneJudge,
    accuracy_report,
    encode_labels,
    images_to_tensor,
    judge_scenes,
    load_judge,
    save_judge,
    scene_batch,
    split_logits,
)

TRAIN_SEED = 0
EVAL_SEED = 1  # tools/judge/README.md figures; tests use seed 3


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruptions so the judge also reads imperfect (generated) images.

    Per image: with p=0.3 a partial 3x3 blur (mix factor up to 0.6), with p=0.5
    Gaussian noise (std up to 0.08 on the [-1, 1] scale).
    """
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (
        (torch.rand(b, 1, 1, 1, generator=generator) < 0.3)
        * torch.rand(b, 1, 1, 1, generator=generator)
        * 0.6
    )
    x = x + mix * (blur - x)
    noisy = (
        (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
        * torch.rand(b, 1, 1, 1, generator=generator)
        * 0.08
    )
    x = x + noisy * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


def loss_fn(logits: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropies: background, layout, and shape / colour / size of occupied cells."""
    parts = split_logits(logits)
    loss = F.cross_entropy(parts["background"], labels["background"])
    loss = loss + F.cross_entropy(parts["layout"], labels["layout"])
    for name in ("shape", "colour", "size"):
        classes = parts[name].shape[-1]
        loss = loss + F.cross_entropy(
            parts[name].reshape(-1, classes), labels[name].reshape(-1), ignore_index=IGNORE
        )
    return loss


def evaluate(model: SceneJudge, seed: int, scenes: int) -> dict[str, float]:
    """Held-out accuracy of ``model`` on scenes ``0 .. scenes-1`` of stream ``seed``."""
    images, specs = scene_batch(seed, 0, scenes)
    return accuracy_report(specs, judge_scenes(images, model.eval()))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.torch_seed)
    generator = torch.Generator().manual_seed(args.torch_seed)
    model = SceneJudge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 2% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    started = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        model.train()
        images, specs = scene_batch(args.train_seed, step * args.batch, args.batch)
        x = augment(images_to_tensor(images), generator)
        loss = loss_fn(model(x), encode_labels(specs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{args.steps}  loss {running:.4f}  {elapsed:.0f}s", flush=True)
    train_seconds = time.perf_counter() - started
    report = evaluate(model, args.eval_seed, args.eval_scenes)
    extra = {
        "train_command": " ".join(["python", "tools/attribute_classifier.py", *sys.argv[1:]]),
        "train_seconds": f"{train_seconds:.0f}",
        "train_scenes": str(args.steps * args.batch),
        "eval": json.dumps({"seed": args.eval_seed, **report}),
    }
    path = save_judge(model, args.out, extra)
    print(f"trained in {train_seconds:.0f}s on {args.steps * args.batch} scenes; wrote {path}")
    print_report(report)


def print_report(report: dict[str, float]) -> None:
    for key, value in report.items():
        print(f"{key:12s} {value:.4f}" if key != "scenes" else f"{key:12s} {int(value)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from scratch and save the weights")
    t.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--train-seed", type=int, default=TRAIN_SEED)
    t.add_argument("--torch-seed", type=int, default=0)
    t.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    t.add_argument("--eval-scenes", type=int, default=2000)
    t.add_argument("--log-every", type=int, default=100)
    e = sub.add_parser("eval", help="held-out accuracy of saved weights")
    e.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--scenes", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        if args.train_seed in (args.eval_seed, 3):
            parser.error("--train-seed must differ from the evaluation seeds")
        train(args)
    else:
        started = time.perf_counter()
        report = evaluate(load_judge(args.weights), args.seed, args.scenes)
        print_report(report)
        print(f"({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
