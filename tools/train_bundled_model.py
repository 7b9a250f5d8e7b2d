"""Train the bundled text-to-image latent diffusion model from scratch on CPU.

Usage::

    python tools/train_bundled_model.py --out DIR [--preset bundled] [--threads 2] [--seed 0]
    python tools/train_bundled_model.py --out DIR --resume          # continue an interrupted run
    python tools/train_bundled_model.py --out DIR --preset smoke    # seconds, tiny sizes
    python tools/train_bundled_model.py --out DIR --start-from models/bundled/bundled.safetensors
                                    # only the binding rounds, from a released checkpoint

Stages (sizes and hyper-parameters in ``ldm/training/presets.py``):

1. the KL autoencoder (f=4, 64x64x3 -> 16x16x4);
2. the UNet (spatial transformers at 16x16 and 8x8) jointly with the BERT text
   encoder, on the generator's 50/50 mix of one- and two-object scenes;
2b. binding rounds: more diffusion steps from the previous EMA weights on scenes
   with two objects 75% of the time, where the model learns which shape and colour
   belong to which object (stage 2 alone left two-object prompts at 34% right);
3. a decoder fine-tune (encoder and latent space unchanged).

DIR then receives ``<stem>.safetensors`` (original layout, fp16), ``.yaml``,
``.json``, ``tokenizer/vocab.txt`` and ``MODEL_CARD.md``. Training state is saved
every ``--checkpoint-every`` steps under ``DIR/train_state``; ``--resume`` continues
from it with exactly the steps an uninterrupted run would have taken (data and
noise depend only on seed, stage and step). Log lines (stderr) show loss and s/step.

Step times on the 2-core sandbox (torch 2.13 CPU, 2 threads), from the logs of the
shipped model's runs: autoencoder 0.16 s, diffusion (stage 2 and 2b: render 32
scenes, encode, BERT + UNet forward and backward, AdamW, EMA) 0.7-1.3 s, decoder
fine-tune 1.3 s (timed only at 1 thread with other jobs running). ``models/bundled/MODEL_CARD.md``
records the run's wall time.

``--device cuda`` trains on a GPU; all random draws stay on the CPU, so data and
noise are those of a CPU run.
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
    p.add_argument("--binding-steps", type=int, nargs="+", default=None,
                   help="steps of each stage-2b round, or 0 to skip stage 2b (default: preset)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help="diffusion batch size (default: preset)")
    p.add_argument("--ae-batch-size", type=int, default=None, help="autoencoder batch size (default: preset)")
    p.add_argument("--ae-crop", type=int, default=None, help="autoencoder crop side, 0 = full 64x64 (default: preset)")
    p.add_argument("--ae-lr", type=float, default=None, help="autoencoder peak learning rate (default: preset)")
    p.add_argument("--ldm-lr", type=float, default=None, help="diffusion peak learning rate (default: preset)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="weights, noise, timesteps, caption dropout")
    p.add_argument("--data-seed", type=int, default=7, help="scene stream of the training data")
    p.add_argument("--start-from", type=Path, default=None,
                   help="a released checkpoint of this preset: run only stage 2b (binding) from its weights")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state")
    p.add_argument("--checkpoint-every", type=int, default=250, help="save training state every N steps")
    p.add_argument("--log-every", type=int, default=25, help="log every N steps")
    p.add_argument("--name", default="shapes-ldm-f4", help="model name (the id clients see)")
    p.add_argument("--stem", default=None, help="file stem of the export (default: --name; the shipped model uses 'bundled')")
    p.add_argument("--device", default="cpu", help="cpu or cuda (random draws stay on the CPU)")
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
            binding_steps=None if args.binding_steps is None else tuple(args.binding_steps),
            batch_size=args.batch_size,
            ae_batch_size=args.ae_batch_size,
            ae_crop=args.ae_crop,
            ae_lr=args.ae_lr,
            ldm_lr=args.ldm_lr,
            threads=args.threads,
            seed=args.seed,
            data_seed=args.data_seed,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            name=args.name,
            stem=args.stem,
            fp16=not args.fp32,
            device=args.device,
            command=command,
            start_from=args.start_from,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
