"""``ldm-serve export-triton``: a Triton model repository for any checkpoint the loader accepts.

Layout written (``docs/triton.md``)::

    <out>/<name>/config.pbtxt          python backend, KIND_GPU instances, dynamic batching
    <out>/<name>/configs/cpu.pbtxt     the same with KIND_CPU (tritonserver --model-config-name=cpu)
    <out>/<name>/1/model.py            launcher/triton_model_template.py, verbatim
    <out>/<name>/1/weights/...         the checkpoint and the files beside it (--weights copy)
    <out>/<name>/1/compiled/...        TorchScript files etc. when the backend makes them

``config.pbtxt`` names the checkpoint and the backend in ``parameters`` (``LDM_MODEL``,
``LDM_BACKEND``, ...; :data:`worker.triton_model.PARAMETERS`), so one ``model.py`` serves
every model. ``--weights reference`` writes no weights: ``LDM_MODEL`` is then ``bundled``
(the installed package's model) or the checkpoint's absolute path; the repository committed
under ``model_repository/`` is that export of the bundled model.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ExportedRepository", "config_pbtxt", "export_triton_repository", "MODEL_TEMPLATE"]

MODEL_TEMPLATE = Path(__file__).resolve().parent / "triton_model_template.py"
"""The ``model.py`` every export writes."""

VERSION = "1"


@dataclass(frozen=True)
class ExportedRepository:
    """What :func:`export_triton_repository` wrote."""

    root: Path
    model_dir: Path
    files: list[Path] = field(default_factory=list)
    backend_summary: str = ""


def _tensor(name: str, data_type: str, dims: list[int], *, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def config_pbtxt(
    name: str,
    *,
    kind: str,
    parameters: Mapping[str, str],
    inpainting: bool = False,
    max_batch_size: int = 8,
    queue_delay_us: int = 50_000,
    instances: int = 1,
    comment: str = "",
) -> str:
    """The model configuration (protobuf text format) of one model.

    Args:
        name: the model name (the folder's name).
        kind: ``KIND_GPU`` or ``KIND_CPU``.
        parameters: the ``LDM_*`` parameters (string values).
        inpainting: the model's UNet is an inpainting one: ``IMAGE`` and ``MASK`` inputs are required.
        max_batch_size: rows (images) one execute call may get from the dynamic batcher.
        queue_delay_us: how long the batcher waits to fill a batch (small next to seconds of sampling).
        instances: model instances per device.
        comment: first-line comment (what wrote the file).
    """
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    inputs = [
        _tensor("PROMPT", "TYPE_STRING", [1]),
        _tensor("SEED", "TYPE_INT64", [1]),
        _tensor("NEGATIVE_PROMPT", "TYPE_STRING", [1], optional=True),
        _tensor("STEPS", "TYPE_INT32", [1], optional=True),
        _tensor("GUIDANCE_SCALE", "TYPE_FP32", [1], optional=True),
        _tensor("ETA", "TYPE_FP32", [1], optional=True),
        _tensor("WIDTH", "TYPE_INT32", [1], optional=True),
        _tensor("HEIGHT", "TYPE_INT32", [1], optional=True),
    ]
    if inpainting:
        inputs += [_tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3]), _tensor("MASK", "TYPE_UINT8", [-1, -1])]
    params = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()]
    lines = [
        *([f"# {comment}"] if comment else []),
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(inputs),
        "]",
        "output [",
        _tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3]),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{ kind: {kind} count: {instances} }}",
        "]",
        "parameters [",
        ",\n".join(params),
        "]",
    ]
    return "\n".join(lines) + "\n"


def _copy_checkpoint(checkpoint: Path, weights: Path) -> Path:
    """Copy a checkpoint and what the loader reads beside it (``<stem>.yaml``, ``<stem>.json``,
    ``tokenizer/``); returns the copy's path."""
    weights.mkdir(parents=True, exist_ok=True)
    if checkpoint.is_dir():  # diffusers folder
        target = weights / checkpoint.name
        shutil.copytree(checkpoint, target, dirs_exist_ok=True)
        return target
    target = weights / checkpoint.name
    shutil.copy2(checkpoint, target)
    for suffix in (".yaml", ".json"):
        side = checkpoint.with_suffix(suffix)
        if side.is_file():
            shutil.copy2(side, weights / side.name)
    tokenizer = checkpoint.parent / "tokenizer"
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, weights / "tokenizer", dirs_exist_ok=True)
    return target


def export_triton_repository(
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    name: str | None = None,
    backend: str = "eager",
    weights: str = "copy",
    device: str = "cpu",
    dtype: str = "float32",
    max_batch_size: int = 8,
    queue_delay_us: int = 50_000,
    load: Any = None,
) -> ExportedRepository:
    """Write a Triton model repository serving ``checkpoint`` (default: the bundled model).

    Args:
        out: the repository folder (created; other models in it are left alone).
        checkpoint: a checkpoint file or diffusers folder; None: the bundled model.
        name: the model name (default: the model's own name).
        backend: ``LDM_BACKEND``; a compiling backend (``torchscript`` ...) writes its
            artifacts into ``1/compiled/`` now, so the server loads instead of compiling.
        weights: ``copy`` (self-contained repository) or ``reference`` (``bundled`` or an
            absolute path in ``LDM_MODEL``).
        device, dtype: where artifacts are compiled for (a KIND_GPU instance on CUDA
            compiles its own on first load).
        max_batch_size, queue_delay_us: see :func:`config_pbtxt`.
        load: ``(path) -> pipeline`` (default ``ldm.pipeline.load_pipeline`` on ``device``/``dtype``).
    """
    if weights not in ("copy", "reference"):
        raise ValueError(f"weights must be 'copy' or 'reference', got {weights!r}")
    from ldm.backends import apply_backend, check_backend
    from worker.default_model import default_model

    if backend != "auto":
        check_backend(backend)
    root = Path(out)
    source = Path(checkpoint) if checkpoint else default_model().path
    if load is None:
        import torch

        from ldm.pipeline import load_pipeline

        def load(path: Path) -> Any:
            return load_pipeline(path, device=device, dtype=getattr(torch, dtype))

    probe = load(source)
    model_name = name or probe.name
    model_dir = root / model_name
    version = model_dir / VERSION
    version.mkdir(parents=True, exist_ok=True)
    if weights == "copy":
        local = _copy_checkpoint(source, version / "weights")
        ldm_model = local.relative_to(version).as_posix()
    else:
        local = source.resolve()
        ldm_model = "bundled" if checkpoint is None else str(local)
    summary = f"backend {backend}: nothing compiled"
    if backend not in ("eager", "auto"):
        pipeline = probe if local == source else load(local)  # compile against the file the server reads
        summary = apply_backend(pipeline, backend, cache_dir=version / "compiled").summary()
    parameters = {
        "LDM_MODEL": ldm_model,
        "LDM_BACKEND": backend,
        "LDM_COMPILE_CACHE": "compiled",
        "LDM_DTYPE": dtype,
        "LDM_CORE_WORKERS": "",
    }
    common = {
        "parameters": parameters,
        "inpainting": bool(probe.config.inpaint_mode),
        "max_batch_size": max_batch_size,
        "queue_delay_us": queue_delay_us,
        "comment": "written by `ldm-serve export-triton` (docs/triton.md); edit the parameters, not model.py",
    }
    files = [model_dir / "config.pbtxt", model_dir / "configs" / "cpu.pbtxt", version / "model.py"]
    files[1].parent.mkdir(exist_ok=True)
    files[0].write_text(config_pbtxt(model_name, kind="KIND_GPU", **common))
    files[1].write_text(config_pbtxt(model_name, kind="KIND_CPU", **common))
    shutil.copyfile(MODEL_TEMPLATE, files[2])
    files += sorted(p for p in version.rglob("*") if p.is_file() and p not in files)
    return ExportedRepository(root=root, model_dir=model_dir, files=files, backend_summary=summary)
