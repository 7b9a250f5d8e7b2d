"""Train the bundled text-to-image latent diffusion model from scratch on CPU.

Usage::

    python tools/train_bundled_model.py --out DIR [--preset bundled] [--threads 2] [--seed 0]
    python tools/train_bundled_model.py --out DIR --resume          # continue an interrupted run
    python tools/train_bundled_model.py --out DIR --preset smoke    # seconds, tiny sizes

Stage 1 trains the KL autoencoder (f=4, 64x64x3 -> 16x16x4), stage 2 the UNet
(spatial transformers at 16x16 and 8x8) jointly with the BERT text encoder; then
DIR receives ``shapes-ldm-f4.safetensors`` (original layout, fp16), ``.yaml``,
``.json``, ``tokenizer/vocab.txt`` and ``MODEL_CARD.md``. Training state is saved
every ``--checkpoint-every`` steps under ``DIR/train_state``; ``--resume`` continues
from it with exactly the steps an uninterrupted run would have taken (data and
noise depend only on seed and step). Log lines (stderr) show loss and it/s.

Bundled sizes (``ldm/training/presets.py``): autoencoder ch 32, ch_mult (1, 2, 2),
1 res block, 0.95 M params; UNet model_channels 64, channel_mult (1, 2), 1 res
block, transformers at ds 1 and 2, 4 heads, context 128, 4.3 M params; BERT text
encoder 4 layers x 128, 0.8 M params.

Measured on the shared 2-core AMD EPYC (AVX2) build machine, torch 2.13 CPU,
2 threads, while other jobs were running (so upper bounds):
MEASURED

Planned full run: PLANNED
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ldm.training.presets import PRESETS
from ldm.training.run import RunOptions, run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (export + train_state/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="bundled")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder steps (default: preset)")
    p.add_argument("--ldm-steps", type=int, default=None, help="diffusion steps (default: preset)")
    p.add_argument("--batch-size", type=int, default=None, help="diffusion batch size (default: preset)")
    p.add_argument("--ae-batch-size", type=int, default=None, help="autoencoder batch size (default: preset)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="weights, noise, timesteps, caption dropout")
    p.add_argument("--data-seed", type=int, default=7, help="scene stream of the training data")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state")
    p.add_argument("--checkpoint-every", type=int, default=250, help="save training state every N steps")
    p.add_argument("--log-every", type=int, default=25, help="log every N steps")
    p.add_argument("--name", default="shapes-ldm-f4", help="model name and checkpoint stem")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python tools/train_bundled_model.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_training(
        RunOptions(
            out=args.out,
            preset=args.preset,
            ae_steps=args.ae_steps,
            ldm_steps=args.ldm_steps,
            batch_size=args.batch_size,
            ae_batch_size=args.ae_batch_size,
            threads=args.threads,
            seed=args.seed,
            data_seed=args.data_seed,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            name=args.name,
            fp16=not args.fp32,
            command=command,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
