"""``ldm-serve hash-key``: the sha256 of an API key, as an ``LDM_API_KEYS_FILE`` entry."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _cmd_hash_key(args: argparse.Namespace) -> int:
    from ldm_serve.api_keys import hash_key, new_key

    if args.new:
        key = new_key()
        print(f"key (give it to the client; it is not stored): {key}", file=sys.stderr)
    else:
        key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("error: empty key", file=sys.stderr)
        return 2
    print(f'[[keys]]\nname = "{args.name}"\nsha256 = "{hash_key(key)}"')
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``hash-key`` to the ``ldm-serve`` parser."""
    hk = subparsers.add_parser("hash-key", help="print the sha256 of an API key for LDM_API_KEYS_FILE (--new: make one)")
    hk.add_argument("key", nargs="?", help="the key (default: read from stdin)")
    hk.add_argument("--new", action="store_true", help="generate a random key and print it with its hash")
    hk.add_argument("--name", default="my-key", help="name for the printed keys-file entry")
    hk.set_defaults(func=_cmd_hash_key)
