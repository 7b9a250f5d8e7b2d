"""Noise schedules and DDIM timestep selection.

Everything here is a pure function of its arguments; nothing holds state, so one
schedule can serve any number of concurrent requests.

Notation (Ho et al. 2020, Song et al. 2021): ``beta_t`` is the per-step noise
variance, ``alpha_t = 1 - beta_t`` and ``alphā_t = prod_{s<=t} alpha_s`` is the
signal fraction left at training step ``t`` (``alphas_cumprod``). ``T`` is the
number of training steps (1000 for every released LDM / SD model).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ldm_serve.errors import ConfigError, InvalidInput
from ldm_serve.limits import img2img_steps

__all__ = [
    "BetaSchedule",
    "TimestepSpacing",
    "alphas_cumprod",
    "ddim_step_count",
    "ddim_timesteps",
    "img2img_timesteps",
    "make_beta_schedule",
]

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "sqrt_linear", "sqrt"]
TimestepSpacing = Literal["uniform", "leading", "trailing", "quad"]

_SPACINGS: tuple[str, ...] = ("uniform", "leading", "trailing", "quad")


def make_beta_schedule(
    kind: str,
    num_timesteps: int,
    linear_start: float,
    linear_end: float,
    *,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """The training noise schedule ``beta_1..beta_T`` of an LDM config, in float64.

    ``kind`` is the config's ``beta_schedule``:

    - ``"linear"`` (the LDM default) and its diffusers name ``"scaled_linear"``:
      linear in ``sqrt(beta)``, i.e. ``linspace(sqrt(start), sqrt(end), T) ** 2``.
      Despite the name this is *not* linear in beta.
    - ``"sqrt_linear"``: linear in beta, ``linspace(start, end, T)`` (diffusers' ``"linear"``).
    - ``"sqrt"``: ``linspace(start, end, T) ** 0.5``.
    - ``"cosine"``: Nichol & Dhariwal (2021) ``alphā(t) ∝ cos²((t/T + s)/(1 + s) · π/2)``,
      betas clipped to ``[0, 0.999]``; ``linear_start`` / ``linear_end`` are ignored.

    Args:
        kind: schedule name, see above.
        num_timesteps: ``T``.
        linear_start: ``beta_1`` (for the linear family).
        linear_end: ``beta_T`` (for the linear family).
        cosine_s: the small offset ``s`` of the cosine schedule.

    Returns:
        ``[T]`` float64 betas.

    Raises:
        ConfigError: unknown ``kind`` or ``num_timesteps < 1``.
    """
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}")
    f64 = torch.float64
    if kind in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=f64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=f64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=f64) ** 0.5
    if kind == "cosine":
        # alphā on the grid t/T, t = 0..T, normalised so alphā(0) = 1
        phase = (torch.arange(num_timesteps + 1, dtype=f64) / num_timesteps + cosine_s) / (1 + cosine_s)
        abar = torch.cos(phase * (math.pi / 2)) ** 2
        abar = abar / abar[0]
        betas = 1 - abar[1:] / abar[:-1]
        return betas.clamp(min=0.0, max=0.999)
    raise ConfigError(
        f"unknown beta_schedule {kind!r}; expected one of linear, scaled_linear, cosine, sqrt_linear, sqrt"
    )


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``alphā_t = prod_{s<=t} (1 - beta_s)``, computed in float64 and returned as float32.

    float32 is what the original model stores in its ``alphas_cumprod`` buffer, so
    this is the table every sampler indexes.

    Args:
        betas: ``[T]`` betas (any float dtype; upcast to float64 first).

    Returns:
        ``[T]`` float32, decreasing from ``1 - beta_1``.
    """
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0).to(torch.float32)


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise InvalidInput("steps", f"must be an integer, got {type(num_steps).__name__}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise InvalidInput("steps", f"must be between 1 and {num_train_timesteps}, got {num_steps}")


def _ddim_timesteps_np(num_steps: int, num_train_timesteps: int, spacing: str) -> np.ndarray:
    """The timestep grid as int64 numpy, ASCENDING, validated against ``[0, T)``."""
    _check_steps(num_steps, num_train_timesteps)
    T, S = num_train_timesteps, int(num_steps)
    if spacing == "uniform":
        # CompVis make_ddim_timesteps('uniform'): every c-th step, shifted by +1.
        # When S does not divide T, arange yields ceil(T / c) > S entries (the
        # original's count assert is commented out), and all of them are sampled.
        c = T // S
        ts = np.arange(0, T, c, dtype=np.int64) + 1
    elif spacing == "leading":
        # diffusers DDIMScheduler, timestep_spacing="leading", steps_offset=1
        ts = np.arange(S, dtype=np.int64) * (T // S) + 1
    elif spacing == "trailing":
        # diffusers DDIMScheduler, timestep_spacing="trailing" (starts at T-1): the
        # same float np.arange grid and round-half-even (ties like 62.5 occur, so the
        # grid's last-ulp rounding matters). For some S (61, 103, 121, ...) that float
        # arange has one extra point, which diffusers turns into t = -1; we keep S.
        grid = np.arange(T, 0, -T / S)[:S]
        ts = (np.round(grid).astype(np.int64) - 1)[::-1]
    elif spacing == "quad":
        # CompVis make_ddim_timesteps('quad'): quadratic in t up to 0.8 T, +1 shift.
        # For S >= 30 the first entries repeat (e.g. 1, 1); the original samples the
        # repeats too (a repeated step is a no-op update that still calls the model).
        ts = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64) + 1
    else:
        raise InvalidInput("spacing", f"unknown timestep spacing {spacing!r}; expected one of {_SPACINGS}")
    if ts.min() < 0 or ts.max() >= T:
        # e.g. 'uniform' with S = 3, 9, 27, 36, 37, 101..111, 251..333 or > 500, and
        # 'leading' with S = T: the +1 shift lands on t = T, past the end of alphā
        # (the original raises IndexError there).
        raise InvalidInput(
            "steps",
            f"{S} steps with {spacing!r} spacing would use timestep {int(ts.max())}, outside the "
            f"model's 0..{T - 1}; choose another step count or spacing",
        )
    return ts


def ddim_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: TimestepSpacing = "uniform",
) -> torch.Tensor:
    """The training timesteps a DDIM run visits, in the order it visits them (descending).

    Spacings (``T = num_train_timesteps``, ``S = num_steps``):

    - ``"uniform"``: CompVis ``make_ddim_timesteps(..., 'uniform')``:
      ``arange(0, T, T // S) + 1``. When ``S`` does not divide ``T`` this has
      **more than S entries** (S=15 -> 16 steps from t=991; S=30 -> 31 steps from
      t=991) because the original never checks the count; we reproduce that, so use
      :func:`ddim_step_count` for the number of model calls.
    - ``"leading"``: diffusers ``DDIMScheduler(timestep_spacing="leading",
      steps_offset=1)``: ``arange(S) * (T // S) + 1``; exactly ``S`` steps. Equal to
      ``"uniform"`` whenever ``len(range(0, T, T // S)) == S`` (e.g. S divides T).
    - ``"trailing"``: diffusers ``timestep_spacing="trailing"``:
      ``round(arange(T, 0, -T / S)) - 1``, starting at ``T - 1``. (diffusers
      appends a spurious ``t = -1`` step for some S, e.g. 61; we do not.)
    - ``"quad"``: CompVis ``'quad'``: ``int(linspace(0, sqrt(0.8 T), S) ** 2) + 1``.

    Args:
        num_steps: requested number of sampling steps ``S``.
        num_train_timesteps: ``T``.
        spacing: one of the above.

    Returns:
        ``[n]`` int64, descending (``n = ddim_step_count(...)``).

    Raises:
        InvalidInput: (field ``steps``) ``S < 1``, ``S > T``, or a step count for which
            the spacing would index past the schedule; (field ``spacing``) unknown spacing.
    """
    ts = _ddim_timesteps_np(num_steps, num_train_timesteps, spacing)
    return torch.from_numpy(ts[::-1].copy())


def ddim_step_count(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: TimestepSpacing = "uniform",
) -> int:
    """How many steps (model evaluations per row) :func:`ddim_timesteps` really yields.

    Differs from ``num_steps`` only for ``"uniform"`` when ``num_steps`` does not
    divide ``num_train_timesteps``. Torch-free arithmetic; raises like
    :func:`ddim_timesteps`.
    """
    return int(_ddim_timesteps_np(num_steps, num_train_timesteps, spacing).shape[0])


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a descending DDIM schedule an img2img (SDEdit) row runs at ``strength``.

    As diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps`` and the original
    ``scripts/img2img.py``: with ``n = len(timesteps)``, the last
    ``min(int(n · strength), n)`` entries; the first of them is the level the source
    latent is noised to.

    Raises:
        InvalidInput: (field ``strength``) outside (0, 1], or so small that no step runs.
    """
    n = int(timesteps.numel())
    if not 0.0 < float(strength) <= 1.0:  # also rejects NaN
        raise InvalidInput("strength", f"must be in (0, 1], got {strength}")
    k = img2img_steps(n, strength)
    if k < 1:
        raise InvalidInput(
            "strength", f"{strength:g} of {n} steps runs no step; use at least 1/{n} = {1 / n:.4g} or more steps"
        )
    return timesteps[n - k :]
