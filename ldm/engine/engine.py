"""The continuous-batching engine: a running batch of rows that advances one DDIM step per call.

Every row carries its own latent, conditioning, timestep schedule and step index,
guidance scale, eta and generator (:class:`ldm.sampling.rows.PreparedRow`), so rows
at different steps of different schedules share one UNet forward. Each
:meth:`ContinuousBatchEngine.step`:

1. asks the :class:`~ldm.engine.admission.AdmissionPolicy` which waiting groups join (a
   group is one job: rows that join together) and prepares their rows
   (``x_T`` from the row's generator, text conditioning, inpainting inputs);
2. runs **one** guided UNet forward over every running row (uncond and cond rows
   together, padded to a bucket when configured) and applies each row's own DDIM
   update (:func:`ldm.sampling.ddim.ddim_iteration`, the same code as
   :func:`ldm.sampling.sample_ddim`);
3. decodes the rows that took their last step (batched, or one row at a time
   when the model is batch-invariant) and returns their images;
4. drops groups that finished, failed or were canceled, freeing their budget.

With a batch-invariant model (the default on CPU: batch-invariant kernels, :mod:`ldm.kernels`) a row's
image is bit-identical to the same row sent alone through
``LatentDiffusionPipeline.generate``, whichever rows join and leave around it.

Failure isolation: if the batched step raises, every generator is restored and
each group is stepped alone; only the groups that still fail are dropped (and
reported). The same holds for preparation and decoding.

The engine holds no lock and starts no thread: one owner (the worker's loop)
calls ``add``, ``cancel`` and ``step`` in turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ldm.engine.admission import Admission, AdmissionConfig, AdmissionPolicy, Plan
from ldm.execution.core_pool import CorePool, coordinating
from ldm.sampling.ddim import BlendRows, DenoiseFn, ddim_iteration, gather_coefficients
from ldm.sampling.rows import PreparedRow

__all__ = [
    "ContinuousBatchEngine",
    "EngineModel",
    "EngineStep",
    "FinishedImage",
    "GroupProgress",
    "estimate_unet_row_bytes",
]

log = logging.getLogger(__name__)


class EngineModel(Protocol):
    """What the engine needs from a model (``LatentDiffusionPipeline`` implements it)."""

    device: torch.device
    batch_invariant: bool
    core_pool: CorePool | None  # the one-core threads the model's calls run on, if any

    def validate_row(self, row: Any, width: int, height: int) -> None: ...

    def effective_guidance(self, row: Any) -> float: ...

    def prepare_row(self, row: Any, width: int, height: int) -> PreparedRow: ...

    def make_denoiser(
        self,
        *,
        guidance_scale: Sequence[float],
        context: torch.Tensor | None,
        uncond_context: torch.Tensor | None,
        c_concat: torch.Tensor | None,
        pad_to: int | None = None,
    ) -> DenoiseFn: ...

    def finish_images(self, rows: Sequence[Any], latents: torch.Tensor) -> list[Any]: ...


@dataclass(frozen=True)
class GroupProgress:
    """A group's progress after a step: ``step`` of ``total`` DDIM steps done."""

    group: str
    step: int
    total: int


@dataclass(frozen=True)
class FinishedImage:
    """A decoded image: row ``index`` of ``group``."""

    group: str
    index: int
    image: Any


@dataclass(frozen=True)
class EngineStep:
    """What one :meth:`ContinuousBatchEngine.step` did.

    Attributes:
        plan: the admission policy's plan for this step (``None`` when nothing was scheduled).
        admitted: groups that joined at this step, with their waits.
        progress: per running group, its progress after this step.
        images: rows decoded in this step.
        finished: groups whose last row was decoded in this step.
        failed: ``(group, exception)`` for groups dropped because they failed alone.
        rows: rows in this step's denoising forward.
        denoise_s / prepare_s / decode_s: wall time of the three phases.
    """

    plan: Plan | None = None
    admitted: tuple[Admission, ...] = ()
    progress: tuple[GroupProgress, ...] = ()
    images: tuple[FinishedImage, ...] = ()
    finished: tuple[str, ...] = ()
    failed: tuple[tuple[str, BaseException], ...] = ()
    rows: int = 0
    denoise_s: float = 0.0
    prepare_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class _Row:
    group: str
    index: int
    source: Any  # the caller's row (GenerationRow), for decoding / pasting
    prep: PreparedRow
    x: torch.Tensor  # [C, h, w] float32, after the last completed step
    step: int
    delivered: bool = False  # decoded and handed out

    @property
    def done(self) -> bool:
        return self.step >= self.prep.coef.length


@dataclass
class _Group:
    id: str
    sources: list[Any]
    rows: list[_Row] = field(default_factory=list)  # filled at admission


class ContinuousBatchEngine:
    """A running batch of independent rows, advanced one DDIM step at a time.

    Args:
        model: the model (see :class:`EngineModel`), e.g. a ``LatentDiffusionPipeline``.
        config: the admission policy's budgets and knobs. Buckets are ignored (with a warning)
            for a batch-invariant model, whose UNet calls follow the core workers' shards or rows.
        unet_row_bytes: ``(width, height) -> bytes`` one UNet row needs, for the memory
            budget (see :func:`estimate_unet_row_bytes`); ``None`` counts 0 bytes.
        clock: monotonic seconds, passed to the admission policy and used for timings.
    """

    def __init__(
        self,
        model: EngineModel,
        config: AdmissionConfig,
        *,
        unet_row_bytes: Callable[[int, int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if model.batch_invariant and config.buckets:
            log.warning("batch-invariant model: UNet calls follow core-worker shards or rows; buckets %s ignored",
                        config.buckets)
            config = replace(config, buckets=())
        self.model = model
        self.admission = AdmissionPolicy(config, clock=clock)
        self.unet_row_bytes = unet_row_bytes
        self.clock = clock
        self._groups: dict[str, _Group] = {}
        self.size: tuple[int, int] | None = None  # (width, height) shared by every group

    # ------------------------------------------------------------------ inspection
    @property
    def idle(self) -> bool:
        """No group is waiting or running."""
        return not self._groups

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    @property
    def running_rows(self) -> int:
        return self.admission.running_rows

    def room(self) -> int:
        """Rows new groups could add now (row budget minus running and waiting rows)."""
        return self.admission.room()

    def accepts(self, width: int, height: int) -> bool:
        """Whether groups of this size can join (the engine runs one latent size at a time)."""
        return self.size is None or self.size == (width, height)

    # ------------------------------------------------------------------ admission and removal
    def add(self, group: str, rows: Sequence[Any], width: int, height: int) -> None:
        """Queue a group of rows; it joins the running batch at a coming step boundary.

        Raises:
            InvalidInput: a row is invalid, or the group could never fit the budgets
                (nothing is queued then).
            ValueError: empty group, a known group id, or a size other than the running one.
        """
        if not rows:
            raise ValueError(f"group {group!r} has no rows")
        if group in self._groups:
            raise ValueError(f"group {group!r} is already in the engine")
        if not self.accepts(width, height):
            raise ValueError(f"the engine runs {self.size[0]}x{self.size[1]} rows, not {width}x{height}")
        for row in rows:
            self.model.validate_row(row, width, height)
        unet_rows = sum(2 if self.model.effective_guidance(r) != 1.0 else 1 for r in rows)
        per_row = self.unet_row_bytes(width, height) if self.unet_row_bytes is not None else 0
        self.admission.submit(group, len(rows), unet_rows, unet_rows * per_row)
        self._groups[group] = _Group(group, list(rows))
        self.size = (width, height)

    def cancel(self, group: str) -> bool:
        """Drop a group, waiting or running, at once; False if it is not in the engine."""
        if self._groups.pop(group, None) is None:
            return False
        self.admission.cancel(group)
        self._release_size()
        return True

    def reset(self) -> list[str]:
        """Drop every group (e.g. when their jobs were handed back to the queue); returns their ids."""
        dropped = list(self._groups)
        for g in dropped:
            self.cancel(g)
        return dropped

    def _release_size(self) -> None:
        if not self._groups:
            self.size = None

    def _drop(self, group: str) -> None:
        self._groups.pop(group, None)
        self.admission.cancel(group)
        self._release_size()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> EngineStep:
        """Admit, denoise every running row by one step, decode finished rows (see the module docstring)."""
        if not self._groups:
            return EngineStep()
        plan = self.admission.schedule()
        failed: list[tuple[str, BaseException]] = []

        t0 = self.clock()
        for adm in plan.admitted:
            try:
                self._prepare(self._groups[adm.id])
            except Exception as exc:  # noqa: BLE001 - a group that cannot be prepared fails alone
                log.warning("group %s could not be prepared", adm.id, exc_info=True)
                failed.append((adm.id, exc))
                self._drop(adm.id)
        t1 = self.clock()

        running = [r for g in self._groups.values() for r in g.rows if not r.done]
        advanced = 0
        # denoising and decoding only drive the core workers; preparation (text, image
        # encoders) above keeps this thread's own threads
        with coordinating(self.model.core_pool):
            if running:
                step_failed = self._denoise(running, plan.bucket)
                failed += step_failed
                advanced = sum(1 for r in running if r.group not in dict(step_failed))
            t2 = self.clock()
            progress = tuple(self._progress(g) for g in self._groups.values() if g.rows)
            images, finished, decode_failed = self._decode_finished()
        failed += decode_failed
        t3 = self.clock()
        gone = {g for g, _ in failed}
        return EngineStep(
            plan=plan,
            admitted=tuple(a for a in plan.admitted if a.id not in gone),
            progress=tuple(p for p in progress if p.group not in gone),
            images=tuple(images),
            finished=tuple(finished),
            failed=tuple(failed),
            rows=advanced,
            denoise_s=t2 - t1,
            prepare_s=t1 - t0,
            decode_s=t3 - t2,
        )

    @staticmethod
    def _progress(group: _Group) -> GroupProgress:
        return GroupProgress(
            group.id,
            max(r.step - r.prep.start_step for r in group.rows),
            max(r.prep.coef.length - r.prep.start_step for r in group.rows),
        )

    # ------------------------------------------------------------------ phases
    def _prepare(self, group: _Group) -> None:
        assert self.size is not None
        width, height = self.size
        rows = []
        for i, src in enumerate(group.sources):
            prep = self.model.prepare_row(src, width, height)
            if not 0 <= prep.start_step < prep.coef.length:
                raise ValueError(f"start_step {prep.start_step} outside a {prep.coef.length}-step schedule")
            rows.append(_Row(group.id, i, src, prep, prep.x_T.to(torch.float32), prep.start_step))
        group.rows = rows

    def _denoise(self, running: list[_Row], bucket: int) -> list[tuple[str, BaseException]]:
        """One step for ``running``; on failure, retry group by group and drop the ones that fail alone."""
        states = [_generator_state(r.prep.generator) for r in running]
        try:
            self._commit(running, self._iterate(running, pad_to=bucket))
            return []
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            for r, s in zip(running, states, strict=True):
                _restore_generator(r.prep.generator, s)
            groups = list(dict.fromkeys(r.group for r in running))
            if len(groups) == 1:
                log.warning("step failed for group %s", groups[0], exc_info=True)
                self._drop(groups[0])
                return [(groups[0], exc)]
            log.warning("batched step failed; retrying its %d groups one by one", len(groups), exc_info=True)
        failed: list[tuple[str, BaseException]] = []
        for g in groups:
            rows = [r for r in running if r.group == g]
            group_states = [_generator_state(r.prep.generator) for r in rows]
            try:
                self._commit(rows, self._iterate(rows, pad_to=None))
            except Exception as exc:  # noqa: BLE001 - this group fails alone
                for r, s in zip(rows, group_states, strict=True):
                    _restore_generator(r.prep.generator, s)
                failed.append((g, exc))
                self._drop(g)
        return failed

    def _iterate(self, rows: list[_Row], pad_to: int | None) -> torch.Tensor:
        """The guided UNet forward and DDIM update for ``rows``: their new latents ``[N, C, h, w]``."""
        device = self.model.device
        preps = [r.prep for r in rows]
        x_t = torch.stack([r.x for r in rows])  # [N, C, h, w]
        t, coef = gather_coefficients([p.coef for p in preps], [r.step for r in rows], device)
        context = _stack([p.context for p in preps])  # [N, L, D]
        uncond = None
        if context is not None and any(p.guided for p in preps):
            # rows without guidance never read their uncond slot: zeros fill it
            uncond = torch.stack([
                p.uncond_context if p.guided and p.uncond_context is not None else torch.zeros_like(p.context)
                for p in preps
            ])  # [N, L, D]
        denoiser = self.model.make_denoiser(
            guidance_scale=[p.guidance_scale for p in preps],
            context=context,
            uncond_context=uncond,
            c_concat=_stack([p.c_concat for p in preps]),  # [N, Cc, h, w]
            pad_to=pad_to if pad_to and pad_to > sum(p.unet_rows for p in preps) else None,
        )
        blending = [k for k, p in enumerate(preps) if p.blend_x0 is not None]
        blend = None
        if blending:
            blend = BlendRows(
                positions=blending,
                x0=torch.stack([preps[k].blend_x0 for k in blending]).to(device, torch.float32),  # [K, C, h, w]
                keep=torch.stack([preps[k].blend_keep for k in blending]).to(device, torch.float32),  # [K, 1, h, w]
            )
        x_prev, _ = ddim_iteration(
            denoiser,
            x_t,
            t,
            torch.arange(len(rows), dtype=torch.int64),
            coef,
            generators=[p.generator for p in preps],
            eta=[p.eta for p in preps],
            blend=blend,
        )
        return x_prev

    def _commit(self, rows: list[_Row], x_prev: torch.Tensor) -> None:
        for k, r in enumerate(rows):
            r.x = x_prev[k]
            r.step += 1

    def _decode_finished(self) -> tuple[list[FinishedImage], list[str], list[tuple[str, BaseException]]]:
        """Decode rows that took their last step; retire groups with every row delivered."""
        ready = [r for g in self._groups.values() for r in g.rows if r.done and not r.delivered]
        images: list[FinishedImage] = []
        failed: list[tuple[str, BaseException]] = []
        if ready:
            try:
                images = self._decode(ready)
            except Exception:  # noqa: BLE001 - isolate by group
                log.warning("batched decode failed; decoding group by group", exc_info=True)
                for g in dict.fromkeys(r.group for r in ready):
                    try:
                        images += self._decode([r for r in ready if r.group == g])
                    except Exception as exc:  # noqa: BLE001 - this group fails alone
                        failed.append((g, exc))
                        self._drop(g)
        finished = []
        for g in list(self._groups.values()):
            if g.rows and all(r.delivered for r in g.rows):
                finished.append(g.id)
                self._groups.pop(g.id)
                self.admission.finish(g.id)
        self._release_size()
        return images, finished, failed

    def _decode(self, rows: list[_Row]) -> list[FinishedImage]:
        latents = torch.stack([r.x for r in rows])  # [N, C, h, w]
        decoded = self.model.finish_images([r.source for r in rows], latents)
        out = []
        for r, image in zip(rows, decoded, strict=True):
            out.append(FinishedImage(r.group, r.index, image))
            r.delivered = True
        return out


def _stack(values: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError("rows in one batch must all have, or all lack, this conditioning input")
    return torch.stack(list(values))  # type: ignore[arg-type]


def _generator_state(g: torch.Generator | None) -> torch.Tensor | None:
    return None if g is None else g.get_state()


def _restore_generator(g: torch.Generator | None, state: torch.Tensor | None) -> None:
    if g is not None and state is not None:
        g.set_state(state)


def estimate_unet_row_bytes(model: Any, width: int, height: int) -> int:
    """A rough upper estimate of the activation memory one UNet batch row needs.

    Counts, per UNet level, a few feature maps of the level's width (ResBlock
    activations plus the skip kept for the decoder) and, at attention levels, the
    unfused ``heads x (hw)²`` attention probabilities. Calibrate the memory budget
    against measured peaks; this only has to rank sizes and batch widths sensibly.
    """
    cfg = model.config.unet
    h, w = height // model.downsample_factor, width // model.downsample_factor
    element = torch.finfo(model.dtype).bits // 8
    total = 0
    for level, mult in enumerate(cfg.channel_mult):
        hw = (h >> level) * (w >> level)
        channels = cfg.model_channels * mult
        total += 6 * channels * hw
        if 2**level in cfg.attention_resolutions:
            heads = cfg.num_heads if cfg.num_heads > 0 else max(1, channels // max(1, cfg.num_head_channels))
            total += 2 * heads * hw * hw  # self-attention probabilities, in and out of softmax
    return int(total * element)
