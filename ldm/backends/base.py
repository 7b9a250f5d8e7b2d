"""Names, adapters and wrappers shared by every execution backend.

A backend turns the eager ``UNetModel`` (or a first stage's ``decode``) into a
faster callable with the same calling convention. Tracers and exporters need a
fixed positional signature, so the UNet is first wrapped in :class:`UNetCall`,
which takes exactly the tensors the config uses (``x``, ``timesteps`` and then
``context`` and/or ``y``); :class:`CompiledUNet` maps the keyword call
``unet(x, t, context=..., y=...)`` back onto it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from ldm_serve.errors import ConfigError, InternalError

__all__ = [
    "BACKENDS",
    "Artifact",
    "BackendName",
    "CompiledDecoder",
    "CompiledUNet",
    "DecoderCall",
    "PaddedRowCounter",
    "UNetCall",
    "UNetShapes",
    "check_backend",
    "check_device_dtype",
    "resolve_backend",
    "unet_input_names",
]

BackendName = Literal["eager", "torchscript", "inductor", "cudagraphs", "tensorrt"]
"""How the UNet and decoder run: as written, traced + frozen TorchScript, ``torch.compile``
(inductor), bucketed CUDA graphs, or TensorRT through torch-tensorrt."""

BACKENDS: tuple[str, ...] = get_args(BackendName)


def resolve_backend(name: str, device: torch.device) -> BackendName:
    """The backend a setting means on ``device``: ``"auto"`` is ``torchscript`` on the CPU
    (the fastest we measured there, ``docs/benchmarks.md``) and ``eager`` elsewhere; any
    other name is checked and returned."""
    if name == "auto":
        return "torchscript" if device.type == "cpu" else "eager"
    return check_backend(name)


def check_backend(name: str) -> BackendName:
    """``name`` if it is a known backend, else :class:`ConfigError` listing them."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown execution backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def check_device_dtype(
    module: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The module's (device, dtype); :class:`ConfigError` if the caller asked for others.

    Backends compile the module where it lives; moving it is the caller's job
    (e.g. ``load_pipeline(..., device="cuda", dtype=torch.float16)``).
    """
    param = next(module.parameters())
    have_device, have_dtype = param.device, param.dtype
    if device is not None and torch.device(device).type != have_device.type:
        raise ConfigError(f"the module is on {have_device}, not {device}; move it before compiling")
    if dtype is not None and dtype != have_dtype:
        raise ConfigError(f"the module is {have_dtype}, not {dtype}; cast it before compiling")
    return have_device, have_dtype


@dataclass(frozen=True)
class UNetShapes:
    """Example UNet input sizes for tracing, export and warm-up (latent space).

    ``batch`` rows of ``[in_channels, height, width]`` latents; ``context_len``
    tokens of conditioning (ignored for UNets without cross-attention).
    """

    batch: int = 1
    height: int = 8
    width: int = 8
    context_len: int = 77


@dataclass
class Artifact:
    """One compiled piece: what it is, where it is cached, and whether the cache served it."""

    part: Literal["unet", "decoder"]
    backend: str
    path: Path | None = None
    loaded_from_cache: bool = False
    seconds: float = 0.0
    note: str = ""


class PaddedRowCounter:
    """Running total of padded (wasted) batch rows; thread-safe.

    The worker exports it as ``ldm_engine_padded_rows_total`` (read :attr:`value`
    and increment a Prometheus counter by the difference).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0
        self._listeners: list[Callable[[int], None]] = []

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(rows)`` on every later :meth:`add` (the worker's Prometheus counter)."""
        with self._lock:
            self._listeners.append(listener)

    def add(self, rows: int) -> None:
        if rows:
            with self._lock:
                self._value += rows
                listeners = list(self._listeners)
            for listener in listeners:
                listener(rows)

    @property
    def value(self) -> int:
        return self._value


def unet_input_names(unet: nn.Module) -> tuple[str, ...]:
    """Positional inputs of :class:`UNetCall` for this UNet: ``x``, ``timesteps``, then
    ``context`` (cross-attention) and/or ``y`` (class labels)."""
    names = ["x", "timesteps"]
    if getattr(unet, "use_spatial_transformer", False):
        names.append("context")
    if getattr(unet, "num_classes", None) is not None:
        names.append("y")
    return tuple(names)


class UNetCall(nn.Module):
    """``unet(x, timesteps, context=..., y=...)`` with a fixed positional signature.

    ``forward(x, timesteps, a, b)`` passes ``a``/``b`` as the UNet's extra inputs
    in the order of :func:`unet_input_names`, so tracers and exporters see only
    the tensors the model really takes.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.extra = unet_input_names(unet)[2:]

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = dict(zip(self.extra, (a, b), strict=False))
        return self.unet(x, timesteps, **kwargs)  # [B, C_out, h, w]


class DecoderCall(nn.Module):
    """``first_stage.decode(z)`` as a module's ``forward`` (for tracing and export).

    Calls the class's ``decode`` explicitly, so it keeps working after
    :func:`ldm.backends.apply_backend` has put a compiled ``decode`` on a copy
    of the instance.
    """

    def __init__(self, first_stage: nn.Module) -> None:
        super().__init__()
        self.first_stage = first_stage

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return type(self.first_stage).decode(self.first_stage, z)  # [B, 3, H, W]


class CompiledUNet(nn.Module):
    """A compiled UNet with ``UNetModel.forward``'s signature.

    The eager module stays registered (``parameters()``, ``config``, ``dtype``
    and the other attributes of the eager UNet still work), but calls go to the
    compiled function. Do not move it with ``.to()`` after compiling.

    Attributes:
        backend: the backend that built it.
        artifacts: what was compiled or loaded (see :class:`Artifact`).
        padded_rows: padded rows counter (bucketed backends), else ``None``.
    """

    def __init__(
        self,
        eager: nn.Module,
        run: Callable[..., torch.Tensor],
        *,
        backend: str,
        artifacts: list[Artifact] | None = None,
        padded_rows: PaddedRowCounter | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.eager = eager
        self.backend = backend
        self.artifacts = list(artifacts or [])
        self.padded_rows = padded_rows
        self.channels_last = channels_last
        self.input_names = unet_input_names(eager)
        object.__setattr__(self, "_run", run)  # a plain attribute: never a registered submodule

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"context": context, "y": y}
        extra = []
        for name in self.input_names[2:]:
            if given[name] is None:
                raise InternalError(name, f"this UNet needs {name!r}")
            extra.append(given[name])
        if x.dim() != 4:
            raise InternalError("x", f"expected [B, C, H, W], got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._run(x, timesteps, *extra)  # [B, C_out, H, W]


class CompiledDecoder:
    """A compiled ``first_stage.decode``: ``z [B, C, h, w] -> image [B, 3, H, W]``.

    A plain callable (not a module), so it can sit in a first stage's instance
    ``__dict__`` without joining its ``state_dict``.
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        backend: str,
        dtype: torch.dtype,
        artifacts: list[Artifact] | None = None,
        channels_last: bool = False,
        source: object = None,
    ) -> None:
        self._run = run
        self.backend = backend
        self.source = source  # the first stage it was compiled from
        self.dtype = dtype
        self.artifacts = list(artifacts or [])
        self.channels_last = channels_last

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self._run(z)  # [B, 3, H, W]
