"""Where the models that ship with ldm-serve live, and the per-user cache and data folders (torch-free).

Which model to serve when none is given (bundled, else the cached random one) is decided in
:mod:`worker.default_model`, which can import ``ldm``.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models" / "bundled"


def bundled_model_path() -> Path | None:
    """The bundled, trained model's checkpoint, or ``None`` until one is shipped."""
    for name in ("bundled.safetensors", "bundled.ckpt"):
        path = BUNDLED_DIR / name
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    """Per-user cache folder (``$XDG_CACHE_HOME/ldm-serve``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ldm-serve"


def data_dir() -> Path:
    """Per-user data folder (``$XDG_DATA_HOME/ldm-serve``, else ``~/.local/share/ldm-serve``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ldm-serve"
