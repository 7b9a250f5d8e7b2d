"""Locating the external tools the deploy tests drive (hadolint, promtool, kubectl, podman)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str | None:
    """Path of ``name``: beside this interpreter (the venv's console scripts) first, then on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)
