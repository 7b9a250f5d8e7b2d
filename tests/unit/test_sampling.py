"""Unit tests of the DDIM sampler and the guidance wrapper, with small fake networks.

The fake UNet below only uses elementwise IEEE operations (mul, add, div, abs) per
row, so its output for a row cannot depend on the other rows in the batch; any
batch dependence the tests see comes from the sampler or the wrapper.
"""

from __future__ import annotations

import pytest
import torch

from ldm.denoiser import GuidedDenoiser
from ldm.noise_schedule import alphas_cumprod, ddim_timesteps, make_beta_schedule
from ldm.sampling import MaskBlend, StepState, latent_keep_mask, sample_ddim
from ldm_serve.errors import InternalError

C, H, W = 4, 8, 8
CTX_LEN, CTX_DIM = 3, 8
ABAR = alphas_cumprod(make_beta_schedule("linear", 1000, 0.00085, 0.012))


class RowwiseUNet:
    """``eps = softsign(W·x + context[:, 0, :C] + class_emb[y]) · (1 + t/1000)``, row by row.

    Channel mixing is an explicit sum of scalar × tensor products (no GEMM, no
    reduction), so every output element is computed the same way at any batch size.
    Records every call.
    """

    def __init__(self, c_in: int = C, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, c_in, generator=g) * 0.6
        self.class_emb = torch.randn(10, C, generator=g)
        self.calls: list[dict[str, torch.Tensor | None]] = []

    def __call__(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        chans = []
        for c in range(C):
            acc = self.w[c, 0] * x[:, 0].float()
            for k in range(1, x.shape[1]):
                acc = acc + self.w[c, k] * x[:, k].float()
            chans.append(acc)
        h = torch.stack(chans, 1)  # [M, C, H, W]
        if context is not None:
            h = h + context[:, 0, :C, None, None]
        if y is not None:
            h = h + self.class_emb[y][:, :, None, None]
        return (h / (1 + h.abs()) * (1 + t.float() / 1000).view(-1, 1, 1, 1)).to(x.dtype)


def _row_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Per-row request data derived from the row's seed only."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "context": torch.randn(1, CTX_LEN, CTX_DIM, generator=g),
        "uncond": torch.randn(1, CTX_LEN, CTX_DIM, generator=g),
        "c_concat": torch.randn(1, 2, H, W, generator=g),
        "x0": torch.randn(1, C, H, W, generator=g),
        "mask": (torch.rand(1, 1, H, W, generator=g) > 0.5).float(),
    }


def _run(rows: list[dict], *, inpaint: bool = False, callback=None, unet=None) -> torch.Tensor:
    """Run a batch made of the given row specs (seed, scale, eta, steps[, blend])."""
    unet = unet or RowwiseUNet(c_in=C + 2 if inpaint else C)
    data = [_row_inputs(r["seed"]) for r in rows]
    gens = [torch.Generator().manual_seed(r["seed"]) for r in rows]
    x_T = torch.cat([torch.randn(1, C, H, W, generator=g) for g in gens])  # caller-made start noise
    cat = lambda key: torch.cat([d[key] for d in data])  # noqa: E731
    denoiser = GuidedDenoiser(
        unet,
        guidance_scale=torch.tensor([r["scale"] for r in rows]),
        context=cat("context"),
        uncond_context=cat("uncond"),
        c_concat=cat("c_concat") if inpaint else None,
    )
    blend = None
    if inpaint:
        blend = MaskBlend(x0=cat("x0"), mask=cat("mask"), rows=torch.tensor([r["blend"] for r in rows]))
    return sample_ddim(
        denoiser,
        x_T,
        [ddim_timesteps(r["steps"]) for r in rows],
        ABAR,
        eta=torch.tensor([r["eta"] for r in rows]),
        generators=gens,
        blend=blend,
        callback=callback,
    )


ROWS = [
    {"seed": 1, "scale": 7.5, "eta": 0.0, "steps": 10, "blend": True},
    {"seed": 2, "scale": 1.0, "eta": 0.7, "steps": 20, "blend": False},
    {"seed": 3, "scale": 3.0, "eta": 0.7, "steps": 25, "blend": True},
    {"seed": 4, "scale": 1.0, "eta": 0.0, "steps": 50, "blend": True},
]


@pytest.mark.parametrize("inpaint", [False, True], ids=["txt2img", "inpaint-concat+blend"])
def test_each_row_is_bit_identical_to_running_alone(inpaint: bool) -> None:
    batched = _run(ROWS, inpaint=inpaint)
    assert batched.dtype == torch.float32 and batched.shape == (4, C, H, W)
    for b, row in enumerate(ROWS):
        alone = _run([row], inpaint=inpaint)
        assert torch.equal(batched[b], alone[0]), f"row {b} changed by its batch-mates"
    # the rows really differ (seed, scale, eta and steps all matter)
    assert all(not torch.equal(batched[0], batched[b]) for b in range(1, 4))


def test_rows_with_fewer_steps_leave_the_denoiser_batch() -> None:
    unet = RowwiseUNet()
    rows = [dict(ROWS[0], steps=10), dict(ROWS[1], steps=20)]
    _run(rows, unet=unet)
    # row 0 (scale 7.5) adds an uncond row: 1 + 2 rows while both run, then row 1 (scale 1) alone
    sizes = [call["x"].shape[0] for call in unet.calls]
    assert sizes == [3] * 10 + [1] * 10


def test_guidance_batch_layout_is_uncond_first_in_one_call() -> None:
    unet = RowwiseUNet()
    rows = [dict(ROWS[0], scale=2.0), dict(ROWS[1], scale=1.0), dict(ROWS[2], scale=5.0)]
    data = [_row_inputs(r["seed"]) for r in rows]
    _run(rows, unet=unet)
    first = unet.calls[0]
    assert len(unet.calls) == 25  # one UNet call per iteration; the longest row has 25 steps
    expected_ctx = torch.cat(
        [data[0]["uncond"], data[2]["uncond"], data[0]["context"], data[1]["context"], data[2]["context"]]
    )
    assert torch.equal(first["context"], expected_ctx)
    assert torch.equal(first["x"][0], first["x"][2]) and torch.equal(first["x"][1], first["x"][4])


def test_guidance_formula_matches_separate_passes() -> None:
    unet = RowwiseUNet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, C, H, W, generator=g)
    t = torch.tensor([981, 500, 21])
    cond, uncond = torch.randn(3, CTX_LEN, CTX_DIM, generator=g), torch.randn(3, CTX_LEN, CTX_DIM, generator=g)
    scale = torch.tensor([7.5, 1.0, 0.0])
    den = GuidedDenoiser(unet, guidance_scale=scale, context=cond, uncond_context=uncond)
    e = den(x, t, torch.arange(3))
    e_c, e_u = unet(x, t, context=cond), unet(x, t, context=uncond)
    expected = e_u + scale.view(-1, 1, 1, 1) * (e_c - e_u)
    torch.testing.assert_close(e, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(e[1], e_c[1])  # scale 1: the conditional output untouched
    # a subset of rows picks its own conditioning
    e_sub = den(x[[2, 0]], t[[2, 0]], torch.tensor([2, 0]))
    assert torch.equal(e_sub, e[[2, 0]])


def test_class_conditional_guidance_uses_uncond_labels() -> None:
    unet = RowwiseUNet()
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 900])
    y, y_null = torch.tensor([3, 4]), torch.tensor([9, 9])
    den = GuidedDenoiser(unet, guidance_scale=[3.0, 3.0], y=y, uncond_y=y_null)
    e = den(x, t, torch.arange(2))
    assert torch.equal(unet.calls[-1]["y"], torch.tensor([9, 9, 3, 4]))
    e_c, e_u = unet(x, t, y=y), unet(x, t, y=y_null)
    torch.testing.assert_close(e, e_u + 3.0 * (e_c - e_u), rtol=1e-6, atol=1e-6)


def test_v_parameterization_converts_after_guidance() -> None:
    unet = RowwiseUNet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, H, W, generator=g)
    t = torch.tensor([999, 1])
    cond, uncond = torch.randn(2, CTX_LEN, CTX_DIM, generator=g), torch.randn(2, CTX_LEN, CTX_DIM, generator=g)
    den = GuidedDenoiser(
        unet, guidance_scale=4.0, context=cond, uncond_context=uncond, parameterization="v", alphas_cumprod=ABAR
    )
    e = den(x, t, torch.arange(2))
    v = unet(x, t, context=uncond) + 4.0 * (unet(x, t, context=cond) - unet(x, t, context=uncond))
    a = ABAR[t].double().view(-1, 1, 1, 1)
    expected = (a.sqrt() * v.double() + (1 - a).sqrt() * x.double()).float()
    torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_model_gives_float32_latents() -> None:
    unet = RowwiseUNet()
    den = GuidedDenoiser(unet, model_dtype=torch.float16)
    x_T = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(den, x_T, [ddim_timesteps(5)], ABAR)
    assert unet.calls[0]["x"].dtype == torch.float16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cancel_drops_only_that_row() -> None:
    rows = ROWS[:3]
    reference = _run(rows)
    states: list[StepState] = []

    def cancel_row1_at_4(state: StepState):
        states.append(state)
        return [1] if state.iteration == 4 else None

    out = _run(rows, callback=cancel_row1_at_4)
    assert torch.equal(out[0], reference[0]) and torch.equal(out[2], reference[2])
    assert torch.equal(out[1], states[4].x[1])  # frozen after its 5th step
    assert not torch.equal(out[1], reference[1])
    later = states[5:]
    assert later and all(s.canceled == frozenset({1}) and 1 not in s.active.tolist() for s in later)
    assert all(s.steps_done[1] == 5 for s in later)
    assert states[-1].steps_done == (10, 5, 25)


def test_cancel_all_stops_the_loop() -> None:
    unet = RowwiseUNet()
    out = _run(ROWS[:2], unet=unet, callback=lambda s: s.iteration == 2)
    assert len(unet.calls) == 3 and torch.isfinite(out).all()


def test_callback_sees_monotonic_progress() -> None:
    states: list[StepState] = []
    _run([dict(ROWS[0], steps=10), dict(ROWS[1], steps=20)], callback=states.append)
    assert [s.iteration for s in states] == list(range(20))
    for prev, cur in zip(states, states[1:], strict=False):
        assert all(0 <= c - p <= 1 for p, c in zip(prev.steps_done, cur.steps_done, strict=True))
    assert states[0].steps_done == (1, 1) and states[-1].steps_done == states[-1].steps_total == (10, 20)
    assert [s.active.tolist() for s in states] == [[0, 1]] * 10 + [[1]] * 10
    assert all(s.pred_x0.shape[0] == len(s.active) for s in states)


class _RecordingDenoiser:
    def __init__(self, inner) -> None:
        self.inner, self.inputs = inner, []

    def __call__(self, x, t, rows):
        self.inputs.append((x, t, rows))
        return self.inner(x, t, rows)


def test_mask_blend_renoises_known_region_with_the_rows_generator() -> None:
    """Before every step the kept region is q_sample(x0, t) with noise drawn blend-first, eta-second."""
    seeds, eta = [7, 8], 0.7
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.cat([torch.randn(1, C, H, W, generator=g) for g in gens])
    x0 = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(99))
    keep = torch.zeros(2, 1, H, W)
    keep[..., :, : W // 2] = 1.0  # keep the left half
    den = _RecordingDenoiser(GuidedDenoiser(RowwiseUNet()))
    ts = ddim_timesteps(8)
    states: list[StepState] = []
    sample_ddim(
        den, x_T, [ts, ts], ABAR, eta=eta, generators=gens,
        blend=MaskBlend(x0, keep, rows=torch.tensor([True, False])), callback=states.append,
    )  # fmt: skip
    replay = torch.Generator().manual_seed(seeds[0])
    torch.randn(1, C, H, W, generator=replay)  # x_T
    kept, hole = keep[0].expand(C, H, W).bool(), ~keep[0].expand(C, H, W).bool()
    for i, (x_in, t, _rows) in enumerate(den.inputs):
        a = ABAR[t[0]].double()
        z_blend = torch.randn(C, H, W, generator=replay)
        torch.randn(C, H, W, generator=replay)  # the step's eta noise
        x_known = (a.sqrt() * x0[0].double() + (1 - a).sqrt() * z_blend.double()).float()
        torch.testing.assert_close(x_in[0][kept], x_known[kept], rtol=1e-6, atol=1e-6)
        previous = x_T[0] if i == 0 else states[i - 1].x[0]
        assert torch.equal(x_in[0][hole], previous[hole])  # the hole carries on untouched
        # row 1 does not blend: its input is exactly the previous latent
        assert torch.equal(x_in[1], x_T[1] if i == 0 else states[i - 1].x[1])


def test_all_keep_mask_reproduces_x0_regardless_of_start_noise() -> None:
    """With mask = keep-everything and a denoiser that knows x0 exactly, DDIM returns
    sqrt(ᾱ_0)·x0 + sqrt(1-ᾱ_0)·z_last (last step lands on ᾱ_0, z_last = last blend noise)."""
    x0 = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(3))
    ts = ddim_timesteps(10)

    def oracle(x, t, rows):  # the exact noise for data x0
        a = ABAR[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0[rows]) / (1 - a).sqrt()

    outs = []
    for start_seed in (0, 1):
        x_T = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(start_seed))
        outs.append(
            sample_ddim(
                oracle, x_T, [ts], ABAR, generators=[torch.Generator().manual_seed(42)],
                blend=MaskBlend(x0, torch.ones(1, 1, H, W)),
            )  # fmt: skip
        )
    assert torch.equal(outs[0], outs[1])
    replay = torch.Generator().manual_seed(42)
    z_last = [torch.randn(C, H, W, generator=replay) for _ in ts][-1]
    a0 = ABAR[0].double()
    expected = (a0.sqrt() * x0[0].double() + (1 - a0).sqrt() * z_last.double()).float()
    torch.testing.assert_close(outs[0][0], expected, rtol=1e-5, atol=1e-5)


def test_repaint_everything_equals_no_blend() -> None:
    x0 = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(3))
    x_T = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(4))
    den = GuidedDenoiser(RowwiseUNet())
    blend = MaskBlend.from_repaint_mask(x0, torch.ones(1, 1, H, W))
    assert torch.equal(blend.mask, torch.zeros(1, 1, H, W))
    ts = [ddim_timesteps(10)]
    with_blend = sample_ddim(den, x_T, ts, ABAR, generators=[torch.Generator().manual_seed(5)], blend=blend)
    assert torch.equal(with_blend, sample_ddim(den, x_T, ts, ABAR))


def test_last_step_targets_alpha_bar_0_not_one() -> None:
    """One step from t=1 with a zero-noise model: x_prev = sqrt(ᾱ_0 / ᾱ_1) · x_1."""
    x = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(lambda x, t, rows: torch.zeros_like(x), x, [torch.tensor([1])], ABAR)
    ratio = (ABAR[0].double() / ABAR[1].double()).sqrt()
    torch.testing.assert_close(out.double(), x.double() * ratio, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out, x / ABAR[1].sqrt(), rtol=1e-6, atol=0)  # what a_prev = 1 would give


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timesteps": [ddim_timesteps(5)]}, "timesteps"),
        ({"generators": [None]}, "generators"),
        ({"eta": torch.tensor([0.0, 0.1, 0.2])}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"timesteps": [torch.tensor([1, 2]), ddim_timesteps(5)]}, "timesteps"),
        ({"timesteps": [torch.tensor([1000]), ddim_timesteps(5)]}, "timesteps"),
        ({"timesteps": [torch.tensor([]), ddim_timesteps(5)]}, "timesteps"),
        ({"blend": MaskBlend(torch.zeros(2, C, 4, 4), torch.ones(2, 1, 4, 4))}, "blend"),
        ({"blend": MaskBlend(torch.zeros(2, C, H, W), torch.ones(2, 1, H, W), rows=torch.ones(3))}, "blend"),
    ],
)
def test_invalid_sampler_inputs(kwargs: dict, field: str) -> None:
    args = {"timesteps": [ddim_timesteps(5)] * 2} | kwargs
    x_T = torch.zeros(2, C, H, W)
    with pytest.raises(InternalError, match=field) as info:
        sample_ddim(GuidedDenoiser(RowwiseUNet()), x_T, args.pop("timesteps"), ABAR, **args)
    # below the door: a bug, not a request field (a 500 without "field", never a 422)
    assert info.value.subject == field
    assert info.value.http_status == 500 and "field" not in info.value.to_dict()


def test_callback_cancelling_unknown_row_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        _run(ROWS[:1], callback=lambda s: [3])


def test_invalid_guidance_inputs() -> None:
    ctx = torch.zeros(2, CTX_LEN, CTX_DIM)
    with pytest.raises(InternalError, match="unconditional"):
        GuidedDenoiser(RowwiseUNet(), guidance_scale=[7.5, 1.0], context=ctx)
    with pytest.raises(InternalError, match="uncond_context"):
        GuidedDenoiser(RowwiseUNet(), guidance_scale=7.5, context=ctx, uncond_context=torch.zeros(2, 5, CTX_DIM))
    with pytest.raises(InternalError, match="guidance_scale"):
        GuidedDenoiser(RowwiseUNet(), guidance_scale=[7.5, 1.0, 2.0], context=ctx, uncond_context=ctx)
    with pytest.raises(InternalError, match="alphas_cumprod"):
        GuidedDenoiser(RowwiseUNet(), parameterization="v")
    with pytest.raises(InternalError, match="c_concat"):
        GuidedDenoiser(RowwiseUNet(), context=ctx, c_concat=torch.zeros(3, 1, H, W))


@pytest.mark.parametrize("box", [(0, 0, 1, 1), (5, 3, 6, 4), (3, 7, 13, 30), (1, 1, 31, 31), (8, 8, 16, 16)])
def test_latent_keep_mask_regenerates_every_cell_touching_a_repaint_pixel(box: tuple[int, int, int, int]) -> None:
    """A latent cell is kept iff none of the f x f pixels it covers is to be repainted (unaligned boxes too)."""
    f, side = 4, 32
    x0, y0, x1, y1 = box
    repaint = torch.zeros(1, 1, side, side)
    repaint[..., y0:y1, x0:x1] = 1.0
    keep = latent_keep_mask(repaint, (side // f, side // f))
    assert keep.shape == (1, 1, side // f, side // f) and keep.dtype == torch.float32
    for i in range(side // f):
        for j in range(side // f):
            touched = bool(repaint[0, 0, i * f : (i + 1) * f, j * f : (j + 1) * f].any())
            assert keep[0, 0, i, j].item() == (0.0 if touched else 1.0), (i, j)
    # the cover is tight: nothing but the touched cells is regenerated
    cells = torch.zeros(side // f, side // f)
    cells[y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)] = 1.0
    assert torch.equal(1.0 - keep[0, 0], cells)


def test_latent_keep_mask_per_row_and_shape_checks() -> None:
    repaint = torch.zeros(2, 1, 8, 8)
    repaint[1, 0, 7, 7] = 1.0  # one corner pixel of row 1 only
    keep = latent_keep_mask(repaint, (2, 2))
    assert torch.equal(keep[0], torch.ones(1, 2, 2))
    assert torch.equal(keep[1], torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]))
    with pytest.raises(InternalError, match="mask"):
        latent_keep_mask(torch.zeros(1, 3, 8, 8), (2, 2))
