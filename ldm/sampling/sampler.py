"""DDIM sampling (Song et al. 2021) as a pure function over a batch of independent rows.

``sample_ddim`` holds no state between calls. Each batch row is its own request:
its own timestep list (so its own step count), its own ``eta`` and its own
``torch.Generator``. A row's result is bit-identical whether it runs alone or
with other rows, provided the denoiser is row-wise (see ``tests/unit/test_sampling.py``).

Update rule, per row, exactly as CompVis ``DDIMSampler.p_sample_ddim`` (paper eq. 12):

    pred_x0 = (x_t - sqrt(1 - a_t) · e) / sqrt(a_t)
    sigma   = eta · sqrt((1 - a_prev) / (1 - a_t) · (1 - a_t / a_prev))
    x_prev  = sqrt(a_prev) · pred_x0 + sqrt(1 - a_prev - sigma²) · e + sigma · z,   z ~ N(0, I)

with ``a_t = alphā[t_i]`` and ``a_prev = alphā[t_{i+1}]``; on a row's last step
``a_prev = alphā[0]`` (not 1.0; diffusers' ``set_alpha_to_one=False``). The iteration
itself (coefficients, blending, update, draws) is :func:`ldm.sampling.ddim.ddim_iteration`,
shared with the continuous-batching engine.

Randomness. Every draw for row ``b`` comes from ``generators[b]`` with the shape of
one row ``[C, h, w]``, so it does not depend on the batch. Per row and step the
draw order is:

1. mask-blend noise (only rows with ``blend.rows[b]``),
2. eta noise (only rows with ``eta[b] > 0``, on every step including the last).

Nothing is drawn for a row that needs neither. Draws happen on the generator's own
device (a CPU generator gives the same stream for CPU and GPU latents) and are then
moved to ``x_T``'s device. The caller draws ``x_T`` itself,
normally from the same generator before calling (``randn([1, C, h, w], generator=g)``).
A row whose generator is ``None`` draws from torch's global RNG (not reproducible).
Give each row its own generator object: two rows sharing one generator see each
other's draws and lose batch invariance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ldm.sampling.ddim import BlendRows, StepCoefficients, ddim_iteration, row_coefficients
from ldm_serve.errors import InternalError

__all__ = ["Denoiser", "MaskBlend", "StepCallback", "StepState", "latent_keep_mask", "sample_ddim"]


class Denoiser(Protocol):
    """The sampler's view of a network: predicts the noise ``e`` in ``x_t``.

    Args:
        x: ``[N, C, h, w]`` float32 noisy latents of the rows being denoised.
        t: ``[N]`` int64 training timesteps, one per row (on ``x.device``).
        rows: ``[N]`` int64 **CPU** tensor, the indices of these rows in the full
            batch, so a wrapper can pick its per-row conditioning (on the host, so
            it can branch on them without a device sync).

    Returns:
        ``[N, C, h, w]`` predicted noise (any float dtype; the sampler casts it to float32).
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MaskBlend:
    """Inpainting by mask blending inside DDIM (CompVis ``ddim_sampling(mask=, x0=)``).

    Before every step, for each blending row: ``x_known = sqrt(a_t) · x0 + sqrt(1 - a_t) · z``
    with fresh ``z`` from the row's generator, then ``x = x_known · mask + (1 - mask) · x``.
    There is no blend after the last step (paste the known pixels back in image space).

    Attributes:
        x0: ``[B, C, h, w]`` clean (scaled) latents of the source image.
        mask: ``[B, 1, h, w]`` (or ``[B, C, h, w]``) at latent resolution, **1 = KEEP** the
            known region, 0 = generate (the CompVis convention). Use
            :meth:`from_repaint_mask` for masks where 1 marks the hole.
        rows: ``[B]`` bool, which rows blend; ``None`` = every row.
    """

    x0: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None = None

    @classmethod
    def from_repaint_mask(
        cls, x0: torch.Tensor, repaint_mask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> MaskBlend:
        """Build from a mask with **1 = repaint** (the diffusers / SD-inpaint convention)."""
        return cls(x0=x0, mask=1.0 - repaint_mask, rows=rows)


def latent_keep_mask(repaint: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel repaint mask -> the latent **keep** mask of :class:`MaskBlend` (conservative cover).

    A latent cell is kept (1) only if **none** of the pixels it covers is to be
    repainted; a cell touching even one repaint pixel is regenerated (0). Blending
    a cell that is partly hole would force the source content (e.g. the object being
    replaced) into the hole, and the decoder would spread it into the repainted
    pixels. Known pixels the cover regenerates are restored by the pixel-space paste-back.

    Args:
        repaint: ``[B, 1, H, W]`` float, 1 = repaint (binary).
        latent_hw: ``(h, w)``, normally ``(H / f, W / f)``; with other sizes each
            cell covers the pixels of its adaptive-pooling window.

    Returns:
        ``[B, 1, h, w]`` float32, 1 = keep, 0 = generate.
    """
    if repaint.ndim != 4 or repaint.shape[1] != 1:
        raise InternalError("mask", f"expected a [B, 1, H, W] repaint mask, got {list(repaint.shape)}")
    hole = F.adaptive_max_pool2d(repaint.to(torch.float32), latent_hw)  # [B, 1, h, w], 1 = any pixel repainted
    return 1.0 - hole


@dataclass(frozen=True)
class StepState:
    """What the callback sees after each iteration of the sampling loop.

    Attributes:
        iteration: 0-based loop iteration; row ``b`` is at iteration ``i`` on its step ``i``.
        steps_done: per row, steps completed so far (after this iteration).
        steps_total: per row, the length of its timestep list.
        x: ``[B, C, h, w]`` float32 latents after this iteration (a fresh tensor
            each iteration; do not modify it).
        pred_x0: ``[N, C, h, w]`` this iteration's predicted clean latents for the
            rows in ``active``, in that order.
        active: ``[N]`` int64 CPU, the rows updated in this iteration.
        canceled: rows stopped early by earlier callback returns (cumulative).
    """

    iteration: int
    steps_done: tuple[int, ...]
    steps_total: tuple[int, ...]
    x: torch.Tensor
    pred_x0: torch.Tensor
    active: torch.Tensor
    canceled: frozenset[int]


StepCallback = Callable[[StepState], bool | Iterable[int] | None]
"""Called after every iteration. Return ``None``/``False`` to go on, ``True`` to cancel
every row, or an iterable of row indices to cancel those rows. A canceled row is not
denoised again and its latent in the result stays as it was after its last completed
step; cancelling a row that has already finished is a no-op. The loop ends as soon as
no row has steps left."""


def _as_row_list(name: str, value: Sequence[object] | None, batch: int) -> list:
    if value is None:
        return [None] * batch
    if len(value) != batch:
        raise InternalError(name, f"got {len(value)} entries for a batch of {batch} rows")
    return list(value)


def _check_timesteps(timesteps: Sequence[torch.Tensor], batch: int, num_train: int) -> list[torch.Tensor]:
    """Validate per-row timestep lists; return them as CPU int64 tensors."""
    if len(timesteps) != batch:
        raise InternalError("timesteps", f"got {len(timesteps)} timestep lists for a batch of {batch} rows")
    out = []
    for b, ts in enumerate(timesteps):
        ts = torch.as_tensor(ts).detach().cpu()
        if ts.ndim != 1 or ts.numel() == 0 or ts.is_floating_point() or ts.dtype == torch.bool:
            raise InternalError("timesteps", f"row {b}: expected a non-empty 1-D integer tensor, got {ts}")
        ts = ts.to(torch.int64)
        if int(ts.min()) < 0 or int(ts.max()) >= num_train:
            raise InternalError("timesteps", f"row {b}: values must lie in 0..{num_train - 1}")
        if ts.numel() > 1 and bool((ts[1:] > ts[:-1]).any()):
            raise InternalError("timesteps", f"row {b}: must be descending (the order they are visited)")
        out.append(ts)
    return out


def _check_eta(eta: torch.Tensor | float, batch: int) -> list[float]:
    eta_t = torch.as_tensor(eta, dtype=torch.float64).detach().cpu()
    if eta_t.ndim == 0:
        eta_t = eta_t.expand(batch)
    if eta_t.shape != (batch,):
        raise InternalError("eta", f"expected a scalar or shape [{batch}], got {list(eta_t.shape)}")
    values = eta_t.tolist()
    for b, e in enumerate(values):
        if not 0.0 <= e <= 1.0:  # also rejects NaN
            raise InternalError("eta", f"row {b}: must be in [0, 1], got {e}")
    return values


def _check_blend(blend: MaskBlend | None, x: torch.Tensor) -> list[bool]:
    batch = x.shape[0]
    if blend is None:
        return [False] * batch
    if blend.x0.shape != x.shape:
        raise InternalError("blend", f"x0 has shape {list(blend.x0.shape)}, latents {list(x.shape)}")
    m = blend.mask
    if m.ndim != 4 or m.shape[0] != batch or m.shape[1] not in (1, x.shape[1]) or m.shape[2:] != x.shape[2:]:
        raise InternalError("blend", f"mask must be [B, 1, h, w] = [{batch}, 1, *{list(x.shape[2:])}], got {list(m.shape)}")
    if blend.rows is None:
        return [True] * batch
    rows = torch.as_tensor(blend.rows).detach().cpu()
    if rows.shape != (batch,):
        raise InternalError("blend", f"rows must have shape [{batch}], got {list(rows.shape)}")
    return [bool(r) for r in rows.tolist()]


def _rows_to_cancel(result: object, batch: int) -> set[int]:
    if result is None or result is False:
        return set()
    if result is True:
        return set(range(batch))
    if not isinstance(result, Iterable):
        raise TypeError(f"callback must return None, a bool or an iterable of row indices, got {result!r}")
    rows = {int(r) for r in result}
    bad = sorted(r for r in rows if not 0 <= r < batch)
    if bad:
        raise ValueError(f"callback asked to cancel rows {bad}, outside 0..{batch - 1}")
    return rows


@dataclass(frozen=True)
class _Tables:
    """Every row's coefficients as ``[B, L]`` tables (padded with ones past a row's end)."""

    t: torch.Tensor  # int64 timesteps, on the latents' device
    sqrt_a: torch.Tensor
    sqrt_one_minus_a: torch.Tensor
    sqrt_a_prev: torch.Tensor
    dir_coef: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def build(
        cls, rows: list[torch.Tensor], alphas_cumprod: torch.Tensor, eta: list[float], device: torch.device
    ) -> _Tables:
        """Per-row coefficients from :func:`ldm.sampling.ddim.row_coefficients`, stacked."""
        per_row = [row_coefficients(ts, alphas_cumprod, e, device) for ts, e in zip(rows, eta, strict=True)]
        length = max(r.length for r in per_row)

        def table(name: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
            out = torch.full((len(per_row), length), fill, dtype=dtype, device=device)
            for b, r in enumerate(per_row):
                out[b, : r.length] = getattr(r, name).to(device)
            return out

        return cls(
            t=table("t", 0, torch.int64),
            **{n: table(n, 1.0, torch.float32) for n in ("sqrt_a", "sqrt_one_minus_a", "sqrt_a_prev", "dir_coef", "sigma")},
        )

    def at(self, rows: torch.Tensor, i: int) -> tuple[torch.Tensor, StepCoefficients]:
        """Timesteps ``[N]`` and ``[N, 1, 1, 1]`` coefficients of ``rows`` at iteration ``i``."""

        def col(table: torch.Tensor) -> torch.Tensor:
            return table[rows, i].view(-1, 1, 1, 1)

        coef = StepCoefficients(
            col(self.sqrt_a), col(self.sqrt_one_minus_a), col(self.sqrt_a_prev), col(self.dir_coef), col(self.sigma)
        )
        return self.t[rows, i], coef


def sample_ddim(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps: Sequence[torch.Tensor],
    alphas_cumprod: torch.Tensor,
    *,
    eta: torch.Tensor | float = 0.0,
    generators: Sequence[torch.Generator | None] | None = None,
    blend: MaskBlend | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run DDIM for a batch of independent rows; returns the final latents.

    All rows start together at iteration 0; row ``b`` takes ``len(timesteps[b])``
    steps and then stops, keeping its final latent while longer rows continue. At
    each iteration the denoiser is called **once**, on the rows that still have
    steps left (and are not canceled), in ascending row order.

    Args:
        denoiser: see :class:`Denoiser` (e.g. :class:`ldm.denoiser.GuidedDenoiser`).
        x_T: ``[B, C, h, w]`` initial noise; the result is float32 whatever its dtype.
        timesteps: per row, a descending int64 tensor of training timesteps (from
            :func:`ldm.noise_schedule.ddim_timesteps`); lengths may differ.
        alphas_cumprod: ``[T]`` alphā table (float32, as stored by the model).
        eta: DDIM eta in ``[0, 1]``, a scalar or one per row ``[B]``; 0 = deterministic.
        generators: per row, the source of all noise drawn for that row (see the
            module docstring for the draw order), on any device; ``None`` = global RNG.
        blend: optional mask blending (inpainting with any model), see :class:`MaskBlend`.
        callback: called after each iteration with a :class:`StepState`; its return
            value can cancel rows, see :data:`StepCallback`.

    Returns:
        ``[B, C, h, w]`` float32 latents. Rows canceled via the callback hold their
        latents after their last completed step.

    Raises:
        InternalError: mismatched batch sizes or lengths, timesteps not descending or
            outside the table, eta outside ``[0, 1]``, malformed ``blend``.
    """
    if x_T.ndim != 4:
        raise InternalError("x_T", f"expected [B, C, h, w] latents, got shape {list(x_T.shape)}")
    batch, device = x_T.shape[0], x_T.device
    rows_ts = _check_timesteps(timesteps, batch, alphas_cumprod.shape[0])
    eta_rows = _check_eta(eta, batch)
    gens = _as_row_list("generators", generators, batch)
    blend_rows = _check_blend(blend, x_T)
    lengths = [int(ts.numel()) for ts in rows_ts]
    tables = _Tables.build(rows_ts, alphas_cumprod, eta_rows, device)

    x = x_T.to(torch.float32)  # never modified in place
    steps_done = [0] * batch
    canceled: set[int] = set()

    for i in range(max(lengths)):
        active = [b for b in range(batch) if i < lengths[b] and b not in canceled]
        if not active:
            break
        rows_cpu = torch.tensor(active, dtype=torch.int64)
        rows = rows_cpu.to(device)

        x_t = x.index_select(0, rows)  # [N, C, h, w]
        t, step_coef = tables.at(rows, i)
        blending = [k for k, b in enumerate(active) if blend_rows[b]]
        row_blend = None
        if blending:
            assert blend is not None
            b_idx = rows.index_select(0, torch.tensor(blending, dtype=torch.int64, device=device))
            row_blend = BlendRows(
                positions=blending,
                x0=blend.x0.to(device, torch.float32).index_select(0, b_idx),
                keep=blend.mask.to(device, torch.float32).index_select(0, b_idx),
            )
        # blend, one denoiser call for all active rows, DDIM update (shared with the engine)
        x_prev, pred_x0 = ddim_iteration(
            denoiser,
            x_t,
            t,
            rows_cpu,
            step_coef,
            generators=[gens[b] for b in active],
            eta=[eta_rows[b] for b in active],
            blend=row_blend,
        )
        x = x.index_copy(0, rows, x_prev)
        for b in active:
            steps_done[b] += 1

        if callback is not None:
            state = StepState(
                iteration=i,
                steps_done=tuple(steps_done),
                steps_total=tuple(lengths),
                x=x,
                pred_x0=pred_x0,
                active=rows_cpu,
                canceled=frozenset(canceled),
            )
            for b in _rows_to_cancel(callback(state), batch):
                if steps_done[b] < lengths[b]:
                    canceled.add(b)
    return x
