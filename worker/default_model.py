"""The one answer to "which model when none is given": the bundled model, else the tiny random one.

Used by the worker (``load_model`` without ``model_path``), ``ldm-serve up | worker | generate``
and the benches. The random fallback is written once into a content-addressed folder of the
per-user cache, ``<cache>/random-untrained/<hash>/``, where ``<hash>`` is a digest of its config,
seed and file format: a later start (any process, any command) finds and reuses it and never
rewrites it; a changed config gets a new folder. It is written into a temporary sibling folder
and renamed into place, so a reader never sees a half-written model and two processes starting
at once both end up with the same complete files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from ldm_serve.models import bundled_model_path, cache_dir

RANDOM_MODEL_SEED = 0
RANDOM_MODEL_FILE = "random-untrained.safetensors"
_FORMAT = "random-untrained/1"  # bump when write_random_model's output changes for the same config


class DefaultModel(NamedTuple):
    """The checkpoint to serve and whether it is the untrained random fallback."""

    path: Path
    untrained: bool


def random_model_digest(seed: int = RANDOM_MODEL_SEED) -> str:
    """16 hex digits naming the random model's cache folder (config, seed and file format)."""
    from ldm.random_model import RANDOM_MODEL_CONFIG  # torch: only when the fallback is needed

    text = f"{_FORMAT}\n{seed}\n{RANDOM_MODEL_CONFIG!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def random_model_path(directory: Path | None = None, *, seed: int = RANDOM_MODEL_SEED) -> Path:
    """The cached tiny untrained model's checkpoint, written on first use only.

    Args:
        directory: the cache root (default ``<user cache>/random-untrained``); the model goes
            into its ``<digest>/`` sub-folder.
        seed: weights seed (part of the digest).
    """
    root = directory or cache_dir() / "random-untrained"
    target = root / random_model_digest(seed)
    ckpt = target / RANDOM_MODEL_FILE
    if ckpt.is_file():
        return ckpt
    from ldm.random_model import write_random_model

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_model(staging, seed=seed)
        try:
            os.rename(staging, target)  # atomic; fails if another process got there first
        except OSError:
            if not ckpt.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ckpt


def default_model(cache: Path | None = None) -> DefaultModel:
    """The bundled model if it is installed, else the cached tiny untrained one."""
    bundled = bundled_model_path()
    if bundled is not None:
        return DefaultModel(bundled, False)
    return DefaultModel(random_model_path(cache), True)
