"""The ``ldm-serve`` command line (the ``[project.scripts]`` entry point).

``generate``, ``img2img`` and ``inpaint`` run a model in-process (no queue); ``up``, ``gateway`` and
``worker`` run the service; ``export-onnx`` and ``hash-key`` are tools.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from launcher.commands import generate, keys, serve
from ldm_serve.errors import LdmServeError


def build_parser() -> argparse.ArgumentParser:
    """The ``ldm-serve`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="ldm-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_commands(sub)
    keys.add_commands(sub)
    serve.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a :class:`~ldm_serve.errors.LdmServeError` prints ``error: ...`` and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LdmServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
