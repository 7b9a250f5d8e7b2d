"""``ldm-serve export-triton``: write a Triton model repository (python backend) for a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from ldm_serve.cpu_threads import quiet_openmp_for_core_workers

    quiet_openmp_for_core_workers(args.device, None)  # before torch loads
    from launcher.triton_export import export_triton_repository  # lazy: imports torch

    repo = export_triton_repository(
        args.out,
        checkpoint=args.checkpoint,
        name=args.name,
        backend=args.backend,
        weights=args.weights,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        queue_delay_us=int(args.queue_delay_ms * 1000),
    )
    for path in repo.files:
        print(path)
    print(repo.backend_summary)
    print(f"serve it: tritonserver --model-repository {repo.root} [--model-config-name=cpu]")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``export-triton`` to the ``ldm-serve`` parser."""
    p = sub.add_parser("export-triton", help="write a Triton model repository (python backend) for a model")
    p.add_argument("--model", "--checkpoint", dest="checkpoint", help="checkpoint file or diffusers folder "
                   "(default: the bundled model)")
    p.add_argument("--out", required=True, help="repository folder (the model goes into <out>/<name>/)")
    p.add_argument("--name", help="Triton model name (default: the model's own name)")
    p.add_argument("--backend", default="eager",
                   choices=["eager", "auto", "torchscript", "inductor", "cudagraphs", "tensorrt"],
                   help="LDM_BACKEND of the model; compiling backends write their artifacts into 1/compiled/ "
                   "now (default: eager, as ldm-serve generate)")
    p.add_argument("--weights", choices=["copy", "reference"], default="copy",
                   help="copy: the checkpoint goes into 1/weights/ (self-contained); reference: LDM_MODEL names "
                   "'bundled' or the checkpoint's absolute path")
    p.add_argument("--device", default="cpu", help="where compiled artifacts are built for")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--max-batch-size", type=int, default=8, help="rows one batched run may take")
    p.add_argument("--queue-delay-ms", type=float, default=50.0, help="dynamic batching: wait to fill a batch")
    p.set_defaults(func=_cmd_export_triton)
