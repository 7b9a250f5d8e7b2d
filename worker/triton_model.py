"""The logic of the Triton python-backend model (``model_repository/<model>/1/model.py``), Triton-free.

``model.py`` is a thin adapter: it turns Triton's ``pb_utils`` requests into plain
``{input name: numpy array}`` dicts, calls :meth:`TritonLDM.execute`, and turns the
results back into responses. Everything else lives here so it runs (and is unit-tested)
without Triton:

* :func:`settings_from_config`: the model file, backend, device and thread settings from
  the ``parameters`` of ``config.pbtxt`` (and the instance kind Triton gives the instance);
* :func:`load_triton_pipeline`: the pipeline, loaded and compiled as the worker does;
* :meth:`TritonLDM.execute`: the rows of every request Triton's dynamic batcher delivers,
  grouped by image size, each group one batched DDIM run through ``pipeline.generate``
  with per-row seeds, steps and guidance, exactly as the RQ worker batches jobs. A request
  with a bad row fails alone (its batch-mates still run).

Inputs (every one has the leading batch dimension Triton adds with ``max_batch_size``;
``[b, 1]`` per request): ``PROMPT`` (BYTES), ``SEED`` (INT64), optional ``NEGATIVE_PROMPT``
(BYTES), ``STEPS`` (INT32), ``GUIDANCE_SCALE`` (FP32), ``ETA`` (FP32), ``WIDTH`` / ``HEIGHT``
(INT32; default the model's size), and for inpainting ``IMAGE`` (UINT8 ``[b, H, W, 3]``) and
``MASK`` (UINT8 ``[b, H, W]``, >= 128 = repaint). Output: ``IMAGE`` (UINT8 ``[b, H, W, 3]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm_serve.errors import ConfigError, InvalidInput

__all__ = [
    "INPUT_NAMES",
    "PARAMETERS",
    "TritonLDM",
    "TritonModelSettings",
    "load_triton_pipeline",
    "resolve_model_path",
    "settings_from_config",
]

BUNDLED = "bundled"
"""``LDM_MODEL`` value meaning the model bundled with the installed ldm-serve package."""

PARAMETERS: dict[str, str] = {
    "LDM_MODEL": "checkpoint file or diffusers folder: relative to the version folder, absolute, or 'bundled'",
    "LDM_BACKEND": "execution backend of the UNet and decoder (eager, torchscript, inductor, cudagraphs, tensorrt, auto)",
    "LDM_COMPILE_CACHE": "compiled artifacts, relative to the version folder (or absolute)",
    "LDM_DTYPE": "float32, float16 or bfloat16",
    "LDM_CORE_WORKERS": "CPU one-core threads over rows; empty: torch's thread count (as ldm-serve generate)",
}
"""The ``parameters`` of ``config.pbtxt`` this model reads, and what each means."""

DTYPES = ("float32", "float16", "bfloat16")

INPUT_NAMES = (
    "PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE_SCALE", "ETA", "WIDTH", "HEIGHT", "IMAGE", "MASK",
)
"""Every input the model reads (``IMAGE`` and ``MASK`` only for inpainting)."""


@dataclass(frozen=True)
class TritonModelSettings:
    """What ``config.pbtxt`` and the instance say about how to load the model.

    Attributes:
        model: the checkpoint to load (resolved).
        backend: ``LDM_BACKEND``.
        compile_cache: where compiled artifacts live (resolved), or None.
        device: ``cpu`` for KIND_CPU instances, ``cuda:<id>`` for KIND_GPU ones.
        dtype: ``LDM_DTYPE``.
        core_workers: ``LDM_CORE_WORKERS`` (None: the pipeline's default).
    """

    model: Path
    backend: str
    compile_cache: Path | None
    device: str
    dtype: str
    core_workers: int | None


def _parameter(config: Mapping[str, Any], key: str, default: str = "") -> str:
    """A ``parameters { key: ... value: { string_value: ... } }`` entry of the parsed model config."""
    entry = (config.get("parameters") or {}).get(key)
    if entry is None:
        return default
    value = entry.get("string_value", default) if isinstance(entry, Mapping) else str(entry)
    return str(value).strip()


def resolve_model_path(value: str, version_dir: Path) -> Path:
    """``LDM_MODEL`` as a path: ``bundled`` is the installed package's bundled model (the tiny
    random one when none ships), a relative path is taken from the version folder."""
    if not value:
        raise ConfigError("config.pbtxt: parameter LDM_MODEL is empty; set a checkpoint path or 'bundled'")
    if value == BUNDLED:
        from worker.default_model import default_model

        return default_model().path
    path = Path(value)
    path = path if path.is_absolute() else version_dir / path
    if not path.exists():
        raise ConfigError(f"config.pbtxt: LDM_MODEL {value!r} does not exist (looked for {path})")
    return path


def settings_from_config(
    config: Mapping[str, Any], version_dir: Path, *, instance_kind: str = "CPU", device_id: int = 0
) -> TritonModelSettings:
    """Read the model's settings from Triton's parsed model config (``json.loads(args["model_config"])``).

    Args:
        config: the model config as a dict.
        version_dir: the version folder (``<repository>/<model>/<version>``), the base of relative paths.
        instance_kind: ``args["model_instance_kind"]`` (``CPU`` or ``GPU``).
        device_id: ``args["model_instance_device_id"]``.

    Raises:
        ConfigError: a parameter is missing or out of range (the message names it).
    """
    dtype = _parameter(config, "LDM_DTYPE", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"config.pbtxt: LDM_DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
    workers_text = _parameter(config, "LDM_CORE_WORKERS")
    core_workers = None
    if workers_text:
        if not workers_text.isdigit() or int(workers_text) < 1:
            raise ConfigError(f"config.pbtxt: LDM_CORE_WORKERS must be an integer >= 1, got {workers_text!r}")
        core_workers = int(workers_text)
    cache_text = _parameter(config, "LDM_COMPILE_CACHE")
    cache = None
    if cache_text:
        cache = Path(cache_text) if Path(cache_text).is_absolute() else version_dir / cache_text
    kind = instance_kind.upper().removeprefix("KIND_")
    return TritonModelSettings(
        model=resolve_model_path(_parameter(config, "LDM_MODEL"), version_dir),
        backend=_parameter(config, "LDM_BACKEND", "eager") or "eager",
        compile_cache=cache,
        device=f"cuda:{device_id}" if kind == "GPU" else "cpu",
        dtype=dtype,
        core_workers=core_workers,
    )


def load_triton_pipeline(settings: TritonModelSettings) -> tuple[Any, str]:
    """The pipeline for ``settings``, on its backend and warmed up; and a one-line summary.

    Loaded with the same defaults as ``ldm-serve generate`` and the worker (batch-invariant
    on the CPU, core workers from torch's thread count), so an image equals theirs for the
    same seed and backend. Runs offline: nothing here reaches the network.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: the loader reads local files only
    from ldm_serve.cpu_threads import quiet_openmp_for_core_workers

    quiet_openmp_for_core_workers(settings.device, settings.core_workers)  # before torch loads
    import torch

    from ldm.backends import apply_backend, resolve_backend
    from ldm.pipeline import load_pipeline

    pipeline = load_pipeline(
        settings.model,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        core_workers=settings.core_workers,
    )
    backend = resolve_backend(settings.backend, pipeline.device)
    summary = f"backend {backend} on {pipeline.device}"
    if backend != "eager":
        report = apply_backend(pipeline, backend, cache_dir=settings.compile_cache)
        summary = report.summary()
    workers = pipeline.core_pool.workers if pipeline.core_pool is not None else 1
    summary += (f"; torch threads {torch.get_num_threads()}, core workers {workers}, "
                f"batch-invariant {pipeline.batch_invariant}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '-')}")
    if pipeline.untrained:
        summary = "UNTRAINED random model (no bundled model installed: outputs are noise); " + summary
    return pipeline, summary


@dataclass(frozen=True)
class _Row:
    request: int  # index of the request in the execute() call
    size: tuple[int, int]  # (width, height)
    row: Any  # ldm.pipeline.GenerationRow


def _column(inputs: Mapping[str, np.ndarray | None], name: str, rows: int) -> np.ndarray | None:
    """Input ``name`` as ``rows`` values (``[b, 1]`` or ``[b]`` arrays), or None when absent."""
    value = inputs.get(name)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape[0] != rows or arr[0].size != 1:
        raise InvalidInput(name, f"must have shape [{rows}, 1] (one value per row), got {list(arr.shape)}")
    return arr.reshape(rows)


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(name, "must be UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InvalidInput(name, f"must be a string (BYTES), got {type(value).__name__}")


def _integer(value: object, name: str) -> int:
    if not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise InvalidInput(name, f"must be an integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


class TritonLDM:
    """Turns the requests of one ``execute`` call into batched DDIM runs.

    Args:
        pipeline: a loaded :class:`ldm.pipeline.LatentDiffusionPipeline`.
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.inpainting = bool(pipeline.config.inpaint_mode)

    def request_rows(self, inputs: Mapping[str, np.ndarray | None]) -> list[tuple[tuple[int, int], Any]]:
        """The validated ``((width, height), GenerationRow)`` of one request's rows.

        Raises:
            InvalidInput: any row is bad (the message names the input and the limit).
        """
        from PIL import Image

        from ldm.pipeline import GenerationRow

        prompts = inputs.get("PROMPT")
        if prompts is None:
            raise InvalidInput("PROMPT", "is required")
        b = int(np.asarray(prompts).shape[0]) if np.asarray(prompts).ndim else 0
        if b < 1:
            raise InvalidInput("PROMPT", "must hold at least one row")
        cols = {name: _column(inputs, name, b) for name in
                ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE_SCALE", "ETA", "WIDTH", "HEIGHT")}
        if cols["SEED"] is None:
            raise InvalidInput("SEED", "is required (one seed per row)")
        images, masks = inputs.get("IMAGE"), inputs.get("MASK")
        if self.inpainting and (images is None or masks is None):
            raise InvalidInput("MASK" if images is not None else "IMAGE", "this is an inpainting model: "
                               "IMAGE [b, H, W, 3] and MASK [b, H, W] are required")
        out = []
        for i in range(b):
            image = mask = None
            default_w = default_h = self.pipeline.default_size
            if images is not None and masks is not None:  # default size: the source image's
                pixels, alpha = self._picture(images, masks, i, b)
                default_h, default_w = pixels.shape[:2]
                image, mask = Image.fromarray(pixels, "RGB"), Image.fromarray(alpha, "L")
            width = _integer(cols["WIDTH"][i], "WIDTH") if cols["WIDTH"] is not None else default_w
            height = _integer(cols["HEIGHT"][i], "HEIGHT") if cols["HEIGHT"] is not None else default_h
            neg = cols["NEGATIVE_PROMPT"]
            row = GenerationRow(
                prompt=_text(cols["PROMPT"][i], "PROMPT"),
                seed=_integer(cols["SEED"][i], "SEED"),
                negative_prompt=_text(neg[i], "NEGATIVE_PROMPT") if neg is not None else "",
                steps=_integer(cols["STEPS"][i], "STEPS") if cols["STEPS"] is not None else 50,
                guidance_scale=float(cols["GUIDANCE_SCALE"][i]) if cols["GUIDANCE_SCALE"] is not None else 7.5,
                eta=float(cols["ETA"][i]) if cols["ETA"] is not None else 0.0,
                image=image,
                mask=mask,
            )
            try:
                self.pipeline.validate_row(row, width, height)
            except InvalidInput as exc:  # name the Triton input, keep the limit in the message
                raise InvalidInput(exc.field.upper(), str(exc).split(": ", 1)[-1]) from None
            if out and out[0][0] != (width, height):
                raise InvalidInput("WIDTH", f"every row of a request must have the same size (one IMAGE tensor), "
                                   f"row 0 is {out[0][0][0]}x{out[0][0][1]}, row {i} is {width}x{height}")
            out.append(((width, height), row))
        return out

    @staticmethod
    def _picture(images: np.ndarray, masks: np.ndarray, i: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = np.asarray(images), np.asarray(masks)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != b or images.shape[3] != 3:
            raise InvalidInput("IMAGE", f"must be UINT8 [{b}, H, W, 3], got {images.dtype} {list(images.shape)}")
        if masks.dtype != np.uint8 or masks.ndim != 3 or masks.shape[0] != b:
            raise InvalidInput("MASK", f"must be UINT8 [{b}, H, W], got {masks.dtype} {list(masks.shape)}")
        return np.ascontiguousarray(images[i]), np.ascontiguousarray(masks[i])

    def execute(self, requests: Sequence[Mapping[str, np.ndarray | None]]) -> list[np.ndarray | Exception]:
        """One result per request, in order: ``IMAGE`` as UINT8 ``[b, H, W, 3]``, or the error
        that failed that request (:class:`InvalidInput` for a bad row; the request fails alone).

        The rows of all requests with the same size run as one ``pipeline.generate`` call
        (one batched DDIM run, per-row seeds, steps and guidance); a row's image does not
        depend on its batch-mates.
        """
        results: list[np.ndarray | Exception | None] = [None] * len(requests)
        pending: list[_Row] = []
        counts = [0] * len(requests)
        for r, inputs in enumerate(requests):
            try:
                rows = self.request_rows(inputs)
            except InvalidInput as exc:
                results[r] = exc
                continue
            counts[r] = len(rows)
            pending += [_Row(r, size, row) for size, row in rows]
        images: dict[int, list[np.ndarray]] = {r: [] for r in range(len(requests))}
        for size in dict.fromkeys(p.size for p in pending):
            group = [p for p in pending if p.size == size]
            try:
                out = self.pipeline.generate([p.row for p in group], *size, validate=False)
            except Exception as exc:  # noqa: BLE001 - fail the requests of this group, not the others
                for p in group:
                    results[p.request] = exc
                continue
            for p, img in zip(group, out, strict=True):
                images[p.request].append(np.asarray(img.convert("RGB"), dtype=np.uint8))  # [H, W, 3]
        for r in range(len(requests)):
            if results[r] is None:
                results[r] = np.stack(images[r])  # [b, H, W, 3]
        return results  # type: ignore[return-value]
