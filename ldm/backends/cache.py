"""Cache keys for compiled artifacts kept on disk between restarts.

An artifact (a frozen TorchScript module, an ONNX file) is only valid for the
exact weights, architecture, code, input shapes, dtype, device type and torch
version it was built from. :func:`artifact_key` hashes all of them:

* weights: :func:`file_identity` of the checkpoint (path, size, mtime) when the
  caller knows the file, else :func:`weights_fingerprint` (a hash of the tensors);
* architecture: the module's config (``repr`` of the config dataclass);
* code: the source files of every class in the module tree and of this package's
  adapters, so editing ``ldm/unet.py`` invalidates old traces.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = ["artifact_key", "atomic_write", "code_fingerprint", "file_identity", "weights_fingerprint"]


def file_identity(path: str | Path) -> str:
    """Cheap identity of a checkpoint file or folder: absolute path, sizes and mtimes."""
    p = Path(path).resolve()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = []
    parts = [str(p)]
    for f in files:
        st = f.stat()
        parts.append(f"{f.name if f == p else f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        data = t.detach().contiguous().cpu()
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def code_fingerprint(module: nn.Module, extra_files: Iterable[str | Path] = ()) -> str:
    """Hash of the source files defining the classes in ``module``'s tree (plus ``extra_files``)."""
    files: set[Path] = {Path(f) for f in extra_files}
    for m in module.modules():
        try:
            src = inspect.getsourcefile(type(m))
        except TypeError:  # built-in
            continue
        if src and not src.startswith(str(Path(torch.__file__).parent)):
            files.add(Path(src))
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()


def artifact_key(
    *,
    part: str,
    backend: str,
    module: nn.Module,
    weights_id: str | None,
    shapes: object,
    dtype: torch.dtype,
    device: torch.device,
    extra: object = None,
) -> str:
    """Hex key of one artifact (see the module docstring for what goes in)."""
    payload = {
        "part": part,
        "backend": backend,
        "weights": weights_id if weights_id is not None else weights_fingerprint(module),
        "config": repr(getattr(module, "config", type(module).__name__)),
        "code": code_fingerprint(module, [Path(__file__).with_name("base.py")]),
        "shapes": repr(shapes),
        "dtype": str(dtype),
        "device": device.type,
        "torch": torch.__version__,
        "extra": repr(extra),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place,
    so a crash never leaves a half-written artifact for the next start to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
