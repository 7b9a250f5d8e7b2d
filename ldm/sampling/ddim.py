"""One DDIM iteration over a set of independent rows, each at its own step.

Both the fixed-batch sampler (:func:`ldm.sampling.sample_ddim`) and the
continuous-batching engine (:mod:`ldm.engine.engine`) run their rows through
:func:`ddim_iteration`, so a row's latents are bit-identical whichever of the two
drives it and whichever rows share its batch (given a row-wise denoiser).

Every operation here is elementwise on a row's own values: coefficients are
computed per row (float64, then cast to float32), gathered into ``[N, 1, 1, 1]``
columns, and every random draw has the shape of one row and comes from that row's
generator. The maths (Song et al. 2021, eq. 12, as CompVis ``p_sample_ddim``)::

    pred_x0 = (x_t - sqrt(1 - a_t) · e) / sqrt(a_t)
    sigma   = eta · sqrt((1 - a_prev) / (1 - a_t) · (1 - a_t / a_prev))
    x_prev  = sqrt(a_prev) · pred_x0 + sqrt(1 - a_prev - sigma²) · e + sigma · z

with ``a_prev = alphā_0`` on a row's last step. Per row and step the draws are, in
order: the mask-blend noise (blending rows only), then the eta noise (rows with
``eta > 0`` only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BlendRows",
    "RowCoefficients",
    "StepCoefficients",
    "ddim_iteration",
    "ddim_update",
    "gather_coefficients",
    "noised_latent",
    "randn_row",
    "row_coefficients",
]

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps(x [N, C, h, w], t [N] int64, rows [N] int64 CPU) -> [N, C, h, w]``, see :class:`ldm.sampling.Denoiser`."""


@dataclass(frozen=True)
class RowCoefficients:
    """One row's DDIM schedule: for each of its ``L`` steps, the timestep and coefficients.

    Attributes:
        t: ``[L]`` int64 training timesteps (CPU), descending.
        sqrt_a, sqrt_one_minus_a, sqrt_a_prev, dir_coef, sigma: ``[L]`` float32 on the
            sampling device: ``sqrt(a_t)``, ``sqrt(1 - a_t)``, ``sqrt(a_prev)``,
            ``sqrt(1 - a_prev - sigma²)`` and ``sigma_t(eta)``.
    """

    t: torch.Tensor
    sqrt_a: torch.Tensor
    sqrt_one_minus_a: torch.Tensor
    sqrt_a_prev: torch.Tensor
    dir_coef: torch.Tensor
    sigma: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.t.numel())


def row_coefficients(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, eta: float, device: torch.device | str
) -> RowCoefficients:
    """Coefficients of one row, computed elementwise in float64 and cast to float32.

    Args:
        timesteps: ``[L]`` int64 descending training timesteps (already validated).
        alphas_cumprod: ``[T]`` alphā table.
        eta: DDIM eta of the row, in ``[0, 1]``.
        device: where the float32 coefficients live (the latents' device).
    """
    ts = timesteps.detach().to("cpu", torch.int64)
    abar = alphas_cumprod.detach().to("cpu", torch.float64)  # [T]
    a_t = abar[ts]  # [L]
    a_prev = torch.empty_like(a_t)
    a_prev[:-1] = abar[ts[1:]]
    a_prev[-1] = abar[0]  # CompVis: the final "previous" alphā is alphā_0, not 1
    sigma = torch.tensor(eta, dtype=torch.float64) * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    dir_coef = torch.sqrt((1 - a_prev - sigma**2).clamp(min=0.0))

    def dev(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float32).to(device)

    return RowCoefficients(
        t=ts,
        sqrt_a=dev(a_t.sqrt()),
        sqrt_one_minus_a=dev((1 - a_t).sqrt()),
        sqrt_a_prev=dev(a_prev.sqrt()),
        dir_coef=dev(dir_coef),
        sigma=dev(sigma),
    )


def noised_latent(
    x0: torch.Tensor, noise: torch.Tensor, timestep: int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``q_sample``: ``sqrt(a_t) · x0 + sqrt(1 - a_t) · noise`` for one row (SDEdit's start).

    The two coefficients are computed as in :func:`row_coefficients` (float64, cast to
    float32), so they equal the row's first-step ``sqrt_a`` / ``sqrt_one_minus_a``.

    Args:
        x0: ``[C, h, w]`` clean (scaled) latent.
        noise: ``[C, h, w]`` N(0, I) draw on ``x0``'s device.
        timestep: the training timestep to noise to.
        alphas_cumprod: ``[T]`` alphā table.
    """
    a_t = alphas_cumprod.detach().to("cpu", torch.float64)[int(timestep)]
    sqrt_a = a_t.sqrt().to(torch.float32).to(x0.device)
    sqrt_one_minus_a = (1 - a_t).sqrt().to(torch.float32).to(x0.device)
    return sqrt_a * x0.to(torch.float32) + sqrt_one_minus_a * noise.to(torch.float32)


@dataclass(frozen=True)
class StepCoefficients:
    """The coefficients of ``N`` rows at their current steps, each ``[N, 1, 1, 1]`` float32."""

    sqrt_a: torch.Tensor
    sqrt_one_minus_a: torch.Tensor
    sqrt_a_prev: torch.Tensor
    dir_coef: torch.Tensor
    sigma: torch.Tensor

    def select(self, index: torch.Tensor) -> StepCoefficients:
        """The coefficients of the rows at ``index`` (positions among the ``N``)."""
        return StepCoefficients(*(v.index_select(0, index) for v in self._values()))

    def _values(self) -> tuple[torch.Tensor, ...]:
        return (self.sqrt_a, self.sqrt_one_minus_a, self.sqrt_a_prev, self.dir_coef, self.sigma)


def gather_coefficients(
    rows: Sequence[RowCoefficients], steps: Sequence[int], device: torch.device | str
) -> tuple[torch.Tensor, StepCoefficients]:
    """Timesteps ``[N]`` (int64 on ``device``) and coefficients of ``rows[k]`` at step ``steps[k]``."""

    def col(name: str) -> torch.Tensor:
        return torch.stack([getattr(r, name)[s] for r, s in zip(rows, steps, strict=True)]).view(-1, 1, 1, 1)

    t = torch.stack([r.t[s] for r, s in zip(rows, steps, strict=True)]).to(device)
    return t, StepCoefficients(
        col("sqrt_a"), col("sqrt_one_minus_a"), col("sqrt_a_prev"), col("dir_coef"), col("sigma")
    )


def randn_row(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One row of N(0, I) noise, drawn on the generator's own device, then moved to ``device``.

    A CPU generator thus yields the same numbers whether the latents live on the CPU
    or a GPU. ``None`` draws from torch's global RNG (not reproducible).
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def ddim_update(
    x_t: torch.Tensor, e: torch.Tensor, coef: StepCoefficients, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM update of eq. 12, elementwise per row: ``(x_prev, pred_x0)``, both ``[N, C, h, w]``.

    ``z`` is the eta noise (zeros for rows with ``eta = 0``).
    """
    pred_x0 = (x_t - coef.sqrt_one_minus_a * e) / coef.sqrt_a
    x_prev = coef.sqrt_a_prev * pred_x0 + coef.dir_coef * e + coef.sigma * z
    return x_prev, pred_x0


@dataclass(frozen=True)
class BlendRows:
    """Mask blending (inpainting with a plain UNet) for some of an iteration's rows.

    Attributes:
        positions: ascending positions, among the iteration's ``N`` rows, of the rows that blend.
        x0: ``[K, C, h, w]`` float32 clean latents of their source images.
        keep: ``[K, 1 | C, h, w]`` float32 masks, 1 = keep the known region.
    """

    positions: Sequence[int]
    x0: torch.Tensor
    keep: torch.Tensor


def ddim_iteration(
    denoiser: DenoiseFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    rows: torch.Tensor,
    coef: StepCoefficients,
    *,
    generators: Sequence[torch.Generator | None],
    eta: Sequence[float],
    blend: BlendRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step for ``N`` rows, each at its own timestep: ``(x_prev, pred_x0)``.

    1. blending rows: re-noise the known region to level ``t`` (``q_sample``) and keep it;
    2. one denoiser call for all ``N`` rows;
    3. the DDIM update, with eta noise from each row's generator.

    Args:
        denoiser: the noise predictor, called once as ``denoiser(x_t, t, rows)``.
        x_t: ``[N, C, h, w]`` float32 latents.
        t: ``[N]`` int64 timesteps on ``x_t.device``.
        rows: ``[N]`` int64 CPU row ids passed through to the denoiser.
        coef: the rows' coefficients at this step (see :func:`gather_coefficients`).
        generators: per row, the source of its noise.
        eta: per row, its DDIM eta (noise is drawn only where ``eta > 0``).
        blend: optional mask blending for some of the rows.
    """
    device = x_t.device
    row_shape = x_t.shape[1:]  # [C, h, w]: every draw has the shape of one row
    if blend is not None and len(blend.positions):
        k_idx = torch.tensor(list(blend.positions), dtype=torch.int64, device=device)
        z = torch.stack([randn_row(row_shape, generators[k], device) for k in blend.positions])
        x_known = coef.sqrt_a.index_select(0, k_idx) * blend.x0 + coef.sqrt_one_minus_a.index_select(0, k_idx) * z
        x_t = x_t.index_copy(0, k_idx, x_known * blend.keep + (1 - blend.keep) * x_t.index_select(0, k_idx))

    e = denoiser(x_t, t, rows)
    if e.shape != x_t.shape:
        raise ValueError(f"denoiser returned shape {list(e.shape)} for input {list(x_t.shape)}")
    e = e.to(torch.float32)

    z = torch.zeros_like(x_t)
    for k, row_eta in enumerate(eta):
        if row_eta > 0:
            z[k] = randn_row(row_shape, generators[k], device)
    return ddim_update(x_t, e, coef, z)
