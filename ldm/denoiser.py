"""Classifier-free guidance around a UNet, as a :class:`ldm.sampling.Denoiser`.

``GuidedDenoiser`` turns ``unet(x, t, context=None, y=None)`` into the sampler's
``eps(x, t, rows)`` for a batch of independent requests, each with its own
conditioning and guidance scale (Ho & Salimans 2022):

    e = e_u + s · (e_c - e_u)

Both halves run in **one** UNet call. For the ``N`` rows of a step, of which ``G``
need guidance (``s != 1``), the UNet batch is ``G + N`` rows::

    [ uncond half: the G guided rows, ascending | cond half: all N rows, ascending ]

(uncond first, as CompVis and diffusers). Rows with ``s == 1`` use ``e = e_c``
directly, so their result does not depend on which other rows share the batch.
That makes the whole step row-wise whenever the UNet itself is (a real UNet's
GEMMs may still round differently at different batch sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ldm.config import Parameterization
from ldm_serve.errors import InternalError

__all__ = ["GuidedDenoiser", "UNetCallable"]

UNetCallable = Callable[..., torch.Tensor]
"""``unet(x [M, C_in, h, w], timesteps [M] int64, context=[M, L, D] | None, y=[M] | None) -> [M, C, h, w]``."""


def _rows_of(name: str, value: torch.Tensor | None, batch: int | None) -> int | None:
    """Check that a per-row tensor agrees with the batch size seen so far."""
    if value is None:
        return batch
    if value.ndim == 0:
        raise InternalError(name, "expected a per-row tensor with a leading batch dimension")
    if batch is not None and value.shape[0] != batch:
        raise InternalError(name, f"has {value.shape[0]} rows, expected {batch}")
    return value.shape[0]


class GuidedDenoiser:
    """Per-row classifier-free guidance; one UNet call per sampler step.

    Args:
        unet: the network, called as ``unet(x, t, context=..., y=...)``.
        guidance_scale: ``[B]`` (tensor or sequence) or one float for every row.
            ``1.0`` = no guidance (one pass for that row).
        context: ``[B, L, D]`` cross-attention conditioning (e.g. CLIP of the prompt).
        uncond_context: ``[B, L, D]`` the unconditional counterpart (CLIP of ``""``
            or a negative prompt); required when any scale differs from 1.
        y: ``[B]`` int64 class labels for class-conditional UNets (``num_classes``).
        uncond_y: ``[B]`` the unconditional labels (e.g. the null class).
        c_concat: ``[B, Cc, h, w]`` concat conditioning (inpainting UNets: the UNet input
            is ``cat([x, c_concat], 1)``, e.g. ``[mask, masked_latent]`` for SD-inpaint);
            the same tensor feeds the uncond half.
        parameterization: ``"eps"`` or ``"v"`` (SD 2 v-models); v is converted with
            ``e = sqrt(a_t) · v + sqrt(1 - a_t) · x_t`` after guidance.
        alphas_cumprod: ``[T]`` alphā table, required for ``"v"``.
        model_dtype: if given, the UNet input ``x`` is cast to it (e.g. float16).
            The output is always returned in ``x``'s dtype (float32 in the sampler).

    Raises:
        InternalError: inconsistent row counts or shapes, guidance without an
            unconditional input, v-parameterization without ``alphas_cumprod``.
    """

    def __init__(
        self,
        unet: UNetCallable,
        *,
        guidance_scale: torch.Tensor | Sequence[float] | float = 1.0,
        context: torch.Tensor | None = None,
        uncond_context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        uncond_y: torch.Tensor | None = None,
        c_concat: torch.Tensor | None = None,
        parameterization: Parameterization = "eps",
        alphas_cumprod: torch.Tensor | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> None:
        batch: int | None = None
        for name, value in (
            ("context", context),
            ("uncond_context", uncond_context),
            ("y", y),
            ("uncond_y", uncond_y),
            ("c_concat", c_concat),
        ):
            batch = _rows_of(name, value, batch)
        if uncond_context is not None and (context is None or uncond_context.shape != context.shape):
            raise InternalError(
                "uncond_context",
                f"must match context's shape {None if context is None else list(context.shape)}, "
                f"got {list(uncond_context.shape)}",
            )
        if uncond_y is not None and (y is None or uncond_y.shape != y.shape):
            raise InternalError("uncond_y", "must be given together with y and have the same shape")

        scale = torch.as_tensor(guidance_scale, dtype=torch.float32).detach().cpu()
        if scale.ndim == 0:
            if batch is None and float(scale) != 1.0:
                raise InternalError("guidance_scale", "guidance needs per-row conditioning")
            scale = scale.expand(batch if batch is not None else 0)
        if scale.ndim != 1 or (batch is not None and scale.shape[0] != batch):
            raise InternalError("guidance_scale", f"expected shape [{batch}], got {list(scale.shape)}")
        self._guided = [s != 1.0 for s in scale.tolist()]  # host-side: which rows need the uncond half
        if any(self._guided):
            has_uncond = (uncond_context is not None or uncond_y is not None) and (
                (context is None) == (uncond_context is None) and (y is None) == (uncond_y is None)
            )
            if not has_uncond:
                raise InternalError(
                    "guidance_scale",
                    "a scale other than 1 needs the unconditional counterpart of every conditioning "
                    "input (uncond_context for context, uncond_y for y)",
                )

        if parameterization not in ("eps", "v"):
            raise InternalError("parameterization", f"expected 'eps' or 'v', got {parameterization!r}")
        if parameterization == "v" and alphas_cumprod is None:
            raise InternalError("alphas_cumprod", "required for v-parameterization")

        self.unet = unet
        self.parameterization = parameterization
        self.model_dtype = model_dtype
        self._scale = scale.contiguous()
        self._context, self._uncond_context = context, uncond_context
        self._y, self._uncond_y = y, uncond_y
        self._c_concat = c_concat
        self._v_coef: tuple[torch.Tensor, torch.Tensor] | None = None
        if alphas_cumprod is not None:
            abar = alphas_cumprod.detach().to(torch.float64)
            # sqrt(alphā_t), sqrt(1 - alphā_t) per training step, float32 like the model buffers
            self._v_coef = (abar.sqrt().to(torch.float32), (1 - abar).sqrt().to(torch.float32))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction for ``x [N, C, h, w]`` at ``t [N]`` for batch ``rows [N]`` (CPU)."""
        device = x.device
        row_list = [int(r) for r in rows.tolist()]
        if self._guided and max(row_list) >= len(self._guided):
            raise InternalError("rows", f"row {max(row_list)} outside a batch of {len(self._guided)}")
        guided_pos = [k for k, r in enumerate(row_list) if self._guided and self._guided[r]]
        n_guided = len(guided_pos)
        rows_dev = rows.to(device)
        pos = torch.tensor(guided_pos, dtype=torch.int64, device=device)  # positions within the N rows
        guided_rows = rows_dev.index_select(0, pos)  # their batch indices

        def halves(uncond: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor | None:
            # per-row batch tensors -> [uncond of guided rows ; cond of all rows]
            if cond is None:
                return None
            cond = cond.to(device).index_select(0, rows_dev)
            if n_guided == 0:
                return cond
            assert uncond is not None
            return torch.cat([uncond.to(device).index_select(0, guided_rows), cond])

        x_in = torch.cat([x.index_select(0, pos), x]) if n_guided else x  # [G + N, C, h, w]
        t_in = torch.cat([t.index_select(0, pos), t]) if n_guided else t  # [G + N]
        context = halves(self._uncond_context, self._context)  # [G + N, L, D]
        y = halves(self._uncond_y, self._y)  # [G + N]
        c_concat = halves(self._c_concat, self._c_concat)  # [G + N, Cc, h, w]
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in.dtype)], dim=1)  # [G + N, C + Cc, h, w]
        if self.model_dtype is not None:
            x_in = x_in.to(self.model_dtype)

        out = self.unet(x_in, t_in, context=context, y=y).to(x.dtype)  # [G + N, C, h, w]
        out_u, out_c = out[:n_guided], out[n_guided:]
        if n_guided:
            s = self._scale.to(device).index_select(0, guided_rows).to(x.dtype).view(-1, 1, 1, 1)
            cond_g = out_c.index_select(0, pos)
            out_c = out_c.index_copy(0, pos, out_u + s * (cond_g - out_u))
        if self.parameterization == "v":
            assert self._v_coef is not None
            sqrt_a, sqrt_1ma = (c.to(device).index_select(0, t).view(-1, 1, 1, 1) for c in self._v_coef)
            return sqrt_a * out_c + sqrt_1ma * x  # e = sqrt(a_t) v + sqrt(1 - a_t) x_t
        return out_c
