"""The continuous-batching engine (``ldm.engine.engine``) with a fake, row-wise denoiser.

The fake UNet of ``tests/unit/test_sampling.py`` is elementwise per row, so any
difference between a row run in the engine and the same row run alone through
``sample_ddim`` would come from the engine's bookkeeping (steps, coefficients,
generators, conditioning slots), which is what these tests pin down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from ldm.denoiser import GuidedDenoiser
from ldm.engine.admission import AdmissionConfig
from ldm.engine.engine import ContinuousBatchEngine, EngineStep
from ldm.execution.padding import PaddedUNet
from ldm.noise_schedule import ddim_timesteps
from ldm.sampling import MaskBlend, sample_ddim
from ldm.sampling.ddim import row_coefficients
from ldm.sampling.rows import PreparedRow
from ldm_serve.errors import InvalidInput
from tests.unit.test_sampling import ABAR, C, H, RowwiseUNet, W, _row_inputs

SIZE = 64  # pixel size passed around; the fake model ignores it


@dataclass(frozen=True)
class Req:
    """A fake request row."""

    seed: int
    steps: int = 10
    scale: float = 1.0
    eta: float = 0.0
    blend: bool = False
    start: int = 0
    bad: bool = False  # refused by validate_row
    explode: bool = False  # its UNet rows raise


class FakeModel:
    """Implements ``ldm.engine.engine.EngineModel`` around a row-wise fake UNet."""

    device = torch.device("cpu")
    core_pool = None  # runs inline

    def __init__(self, *, concat: bool = False, batch_invariant: bool = True, fail_prepare: int | None = None) -> None:
        self.concat = concat
        self.batch_invariant = batch_invariant
        self.fail_prepare = fail_prepare
        self.unet = RowwiseUNet(c_in=C + 2 if concat else C)
        self.calls: list[int] = []  # UNet batch rows per call

    def validate_row(self, row: Req, width: int, height: int) -> None:
        if row.bad:
            raise InvalidInput("prompt", "refused by the fake model")

    def effective_guidance(self, row: Req) -> float:
        return row.scale

    def prepare_row(self, row: Req, width: int, height: int) -> PreparedRow:
        if row.seed == self.fail_prepare:
            raise RuntimeError("cannot prepare")
        g = torch.Generator().manual_seed(row.seed)
        x_T = torch.randn(1, C, H, W, generator=g)[0]
        data = _row_inputs(row.seed)
        if row.explode:
            data["context"] = torch.full_like(data["context"], 999.0)
        return PreparedRow(
            x_T=x_T,
            generator=g,
            coef=row_coefficients(ddim_timesteps(row.steps), ABAR, row.eta, "cpu"),
            eta=row.eta,
            guidance_scale=row.scale,
            context=data["context"][0],
            uncond_context=data["uncond"][0] if row.scale != 1.0 else None,
            c_concat=data["c_concat"][0] if self.concat else None,
            blend_x0=data["x0"][0] if row.blend else None,
            blend_keep=data["mask"][0] if row.blend else None,
            start_step=row.start,
        )

    def _unet(self, x, t, context=None, y=None):
        self.calls.append(x.shape[0])
        if context is not None and bool((context == 999.0).any()):
            raise RuntimeError("simulated kernel failure")
        return self.unet(x, t, context=context, y=y)

    def make_denoiser(self, *, guidance_scale, context, uncond_context, c_concat, pad_to=None):
        unet = PaddedUNet(self._unet, pad_to) if pad_to else self._unet
        return GuidedDenoiser(
            unet, guidance_scale=guidance_scale, context=context, uncond_context=uncond_context, c_concat=c_concat
        )

    def finish_images(self, rows: Sequence[Req], latents: torch.Tensor) -> list[torch.Tensor]:
        return [x.clone() for x in latents]  # "decoding" is the identity: images are the latents


def alone(row: Req, *, concat: bool = False) -> torch.Tensor:
    """The row's final latent from ``sample_ddim`` with only this row in the batch."""
    g = torch.Generator().manual_seed(row.seed)
    x_T = torch.randn(1, C, H, W, generator=g)
    data = _row_inputs(row.seed)
    den = GuidedDenoiser(
        RowwiseUNet(c_in=C + 2 if concat else C),
        guidance_scale=[row.scale],
        context=data["context"],
        uncond_context=data["uncond"],
        c_concat=data["c_concat"] if concat else None,
    )
    blend = MaskBlend(x0=data["x0"], mask=data["mask"]) if row.blend else None
    ts = ddim_timesteps(row.steps)[row.start:]
    return sample_ddim(den, x_T, [ts], ABAR, eta=row.eta, generators=[g], blend=blend)[0]


def run(engine: ContinuousBatchEngine, arrivals: dict[int, list[tuple[str, list[Req]]]],
        cancels: dict[int, list[str]] | None = None, max_steps: int = 200) -> tuple[dict, list[EngineStep]]:
    """Step the engine, adding groups at the given step numbers; returns images by (group, index)."""
    images: dict[tuple[str, int], torch.Tensor] = {}
    reports = []
    for n in range(max_steps):
        for group, rows in arrivals.get(n, []):
            engine.add(group, rows, SIZE, SIZE)
        for group in (cancels or {}).get(n, []):
            engine.cancel(group)
        if engine.idle and n > max(arrivals):
            break
        rep = engine.step()
        reports.append(rep)
        for im in rep.images:
            images[(im.group, im.index)] = im.image
    return images, reports


def test_rows_joining_and_leaving_midway_match_running_alone() -> None:
    model = FakeModel()
    engine = ContinuousBatchEngine(model, AdmissionConfig(max_rows=8))
    a = [Req(1, steps=10, scale=7.5), Req(2, steps=10, scale=7.5, eta=0.3)]
    b = [Req(3, steps=20, scale=1.0, eta=0.7)]
    c = [Req(4, steps=5, scale=3.0, blend=True, eta=1.0)]
    d = [Req(5, steps=25, scale=2.0, start=6, eta=0.5, blend=True)]
    e = [Req(6, steps=8, scale=1.0)]
    images, reports = run(engine, {0: [("a", a), ("b", b)], 3: [("c", c)], 7: [("d", d)], 15: [("e", e)]})
    for group, rows in (("a", a), ("b", b), ("c", c), ("d", d), ("e", e)):
        for i, row in enumerate(rows):
            assert torch.equal(images[(group, i)], alone(row)), f"{group}[{i}] changed by its batch-mates"
    # one UNet forward per step, over rows that joined at different times (uncond + cond rows)
    assert len(model.calls) == len(reports)
    assert model.calls[0] == 2 * 2 + 1 and max(model.calls) > model.calls[0]
    assert [r.admitted[0].id for r in reports if r.admitted][1:] == ["c", "d", "e"]
    assert engine.idle and engine.size is None


def test_concat_conditioning_rows_share_a_batch() -> None:
    model = FakeModel(concat=True)
    engine = ContinuousBatchEngine(model, AdmissionConfig(max_rows=4))
    rows = {"x": [Req(11, steps=6, scale=4.0)], "y": [Req(12, steps=8, scale=1.0, eta=0.2)]}
    images, _ = run(engine, {0: [("x", rows["x"])], 2: [("y", rows["y"])]})
    for g, rs in rows.items():
        assert torch.equal(images[(g, 0)], alone(rs[0], concat=True))


def test_progress_finish_and_images_are_reported_per_group() -> None:
    engine = ContinuousBatchEngine(FakeModel(), AdmissionConfig(max_rows=4))
    engine.add("short", [Req(1, steps=2), Req(2, steps=2)], SIZE, SIZE)
    engine.add("long", [Req(3, steps=4)], SIZE, SIZE)
    first = engine.step()
    assert [a.id for a in first.admitted] == ["short", "long"]
    assert {(p.group, p.step, p.total) for p in first.progress} == {("short", 1, 2), ("long", 1, 4)}
    second = engine.step()
    assert second.finished == ("short",) and sorted(im.index for im in second.images) == [0, 1]
    assert engine.room() == 3
    third = engine.step()
    assert [p.group for p in third.progress] == ["long"] and third.rows == 1


def test_new_group_starts_at_the_next_step_when_there_is_room() -> None:
    engine = ContinuousBatchEngine(FakeModel(), AdmissionConfig(max_rows=2))
    engine.add("first", [Req(1, steps=6)], SIZE, SIZE)
    engine.step()
    engine.add("second", [Req(2, steps=2)], SIZE, SIZE)
    rep = engine.step()
    assert [a.id for a in rep.admitted] == ["second"] and rep.rows == 2
    engine.add("third", [Req(3, steps=2)], SIZE, SIZE)  # no room: waits for a row to leave
    blocked = engine.step()
    assert blocked.admitted == () and blocked.finished == ("second",)
    assert [a.id for a in engine.step().admitted] == ["third"]  # at the boundary after "second" left


def test_cancel_drops_a_groups_rows_at_once() -> None:
    model = FakeModel()
    engine = ContinuousBatchEngine(model, AdmissionConfig(max_rows=4))
    keep, victim = [Req(1, steps=8, eta=0.5)], [Req(2, steps=8), Req(3, steps=8)]
    images, reports = run(engine, {0: [("keep", keep), ("victim", victim)]}, cancels={3: ["victim"]})
    assert set(images) == {("keep", 0)}
    assert torch.equal(images[("keep", 0)], alone(keep[0]))
    assert model.calls[:3] == [3, 3, 3] and model.calls[3:] == [1] * 5
    assert not engine.cancel("victim")


def test_invalid_rows_and_other_sizes_are_refused_at_add() -> None:
    engine = ContinuousBatchEngine(FakeModel(), AdmissionConfig(max_rows=2))
    with pytest.raises(InvalidInput):
        engine.add("bad", [Req(1), Req(2, bad=True)], SIZE, SIZE)
    assert engine.idle and engine.size is None
    with pytest.raises(InvalidInput, match="at most 2"):
        engine.add("wide", [Req(1), Req(2), Req(3)], SIZE, SIZE)
    engine.add("ok", [Req(1)], SIZE, SIZE)
    assert not engine.accepts(2 * SIZE, SIZE)
    with pytest.raises(ValueError, match="runs 64x64"):
        engine.add("other", [Req(2)], 2 * SIZE, SIZE)


def test_a_failing_group_fails_alone_and_the_others_are_unchanged() -> None:
    model = FakeModel()
    engine = ContinuousBatchEngine(model, AdmissionConfig(max_rows=4))
    good = [Req(1, steps=6, scale=5.0, eta=0.8, blend=True)]  # draws noise every step
    images, reports = run(engine, {0: [("good", good)], 2: [("boom", [Req(2, explode=True)])]})
    failed = [f for r in reports for f in r.failed]
    assert [g for g, _ in failed] == ["boom"] and "simulated" in str(failed[0][1])
    assert torch.equal(images[("good", 0)], alone(good[0]))  # generators were restored before the retry


def test_a_group_that_cannot_be_prepared_fails_alone() -> None:
    engine = ContinuousBatchEngine(FakeModel(fail_prepare=2), AdmissionConfig(max_rows=4))
    ok = [Req(1, steps=4)]
    images, reports = run(engine, {0: [("ok", ok), ("broken", [Req(2)])]})
    assert [g for r in reports for g, _ in r.failed] == ["broken"]
    assert [a.id for a in reports[0].admitted] == ["ok"]
    assert torch.equal(images[("ok", 0)], alone(ok[0]))


def test_bucket_padding_pads_the_unet_batch_and_keeps_results() -> None:
    model = FakeModel(batch_invariant=False)
    engine = ContinuousBatchEngine(model, AdmissionConfig(max_rows=8, buckets=(1, 2, 4, 8)))
    rows = {"g": [Req(1, steps=4, scale=3.0)], "h": [Req(2, steps=4), Req(3, steps=4)]}
    images, reports = run(engine, {0: [("g", rows["g"]), ("h", rows["h"])]})
    assert set(model.calls) == {4}  # 2 guided UNet rows + 2 plain ones: exactly a bucket
    assert all(r.plan.padded == 0 for r in reports)
    model.calls.clear()
    images, reports = run(engine, {0: [("g", rows["g"]), ("x", [Req(4, steps=4)])]})
    assert model.calls == [4] * 4 and [r.plan.padded for r in reports] == [1] * 4  # 3 UNet rows -> bucket 4
    assert engine.admission.padded_rows_total == 4
    assert torch.equal(images[("g", 0)], alone(rows["g"][0]))
    # a batch-invariant model runs one row per call: buckets are ignored
    assert ContinuousBatchEngine(FakeModel(), AdmissionConfig(buckets=(4,))).admission.config.buckets == ()
