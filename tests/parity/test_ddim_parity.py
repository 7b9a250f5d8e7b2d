"""Parity of the schedule, the timestep grids and the DDIM sampler with diffusers.

The reference loop drives ``diffusers.DDIMScheduler`` configured as the original
LDM / SD code (``scaled_linear`` 0.00085 -> 0.012, ``clip_sample=False``,
``set_alpha_to_one=False``, ``steps_offset=1``, ``leading``), with classifier-free
guidance written the way the diffusers SD pipeline does it. Both sides use the same
fixed fake noise model, so only the schedule and update arithmetic are compared.
"""

from __future__ import annotations

import pytest
import torch

from ldm.denoiser import GuidedDenoiser
from ldm.noise_schedule import alphas_cumprod, ddim_step_count, ddim_timesteps, make_beta_schedule
from ldm.sampling import sample_ddim

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

T = 1000
B, C, H, W = 2, 4, 16, 16
CTX_LEN, CTX_DIM = 5, 8


def _scheduler(spacing: str = "leading", prediction_type: str = "epsilon"):
    return diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )


def _diffusers_timesteps(steps: int, spacing: str) -> torch.Tensor:
    sched = _scheduler(spacing)
    sched.set_timesteps(steps)
    return sched.timesteps.to(torch.int64)


@pytest.mark.parametrize("steps", [1, 7, 10, 15, 20, 30, 50, 100, 999])
def test_leading_equals_diffusers(steps: int) -> None:
    assert torch.equal(ddim_timesteps(steps, T, "leading"), _diffusers_timesteps(steps, "leading"))


@pytest.mark.parametrize(
    ("steps", "first_t"), [(20, 951), (25, 961), (40, 976), (50, 981), (100, 991), (200, 996), (250, 997)]
)
def test_uniform_equals_diffusers_leading_when_steps_divide_1000(steps: int, first_t: int) -> None:
    ours = ddim_timesteps(steps, T, "uniform")
    assert torch.equal(ours, _diffusers_timesteps(steps, "leading"))
    assert ours[0] == first_t and ddim_step_count(steps) == steps


# (S, steps CompVis runs, first t CompVis, first t diffusers leading) from ldm-reference.md §3.1
COMPVIS_EXTRA_STEPS = [
    (15, 16, 991, 925),
    (30, 31, 991, 958),
    (35, 36, 981, 953),
    (45, 46, 991, 969),
    (60, 63, 993, 945),
    (75, 77, 989, 963),
    (150, 167, 997, 895),
]


@pytest.mark.parametrize(("steps", "count", "first_compvis", "first_diffusers"), COMPVIS_EXTRA_STEPS)
def test_uniform_runs_extra_steps_like_compvis(steps: int, count: int, first_compvis: int, first_diffusers: int) -> None:
    ours = ddim_timesteps(steps, T, "uniform")
    ref = _diffusers_timesteps(steps, "leading")
    assert len(ours) == ddim_step_count(steps) == count > steps == len(ref)
    assert ours[0] == first_compvis and ref[0] == first_diffusers
    assert ours[-1] == 1 and (ours.diff() == -(T // steps)).all()


@pytest.mark.parametrize("steps", [1, 7, 15, 20, 30, 50, 61, 103, 250, 976, 1000])
def test_trailing_equals_diffusers(steps: int) -> None:
    ref = _diffusers_timesteps(steps, "trailing")
    # for some S (61, 103, ...) diffusers' float arange appends a spurious t = -1 step
    assert len(ref) in (steps, steps + 1)
    assert torch.equal(ddim_timesteps(steps, T, "trailing"), ref[:steps])


def test_beta_schedule_matches_diffusers_scaled_linear() -> None:
    sched = _scheduler()
    ours = make_beta_schedule("linear", T, 0.00085, 0.012)
    # diffusers computes in float32, we (like CompVis) in float64
    torch.testing.assert_close(ours.float(), sched.betas, rtol=2e-6, atol=0)
    torch.testing.assert_close(alphas_cumprod(ours), sched.alphas_cumprod, rtol=1e-5, atol=0)


class FakeEpsModel:
    """A fixed network-shaped function: ``tanh(conv3x3(x) + proj(mean_L context)) · (0.5 + t/T)``."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(C, C, 3, 3, generator=g) * 0.3
        self.proj = torch.randn(CTX_DIM, C, generator=g) * 0.5

    def __call__(self, x, t, context=None, y=None):
        h = torch.nn.functional.conv2d(x, self.weight, padding=1)
        if context is not None:
            h = h + (context.mean(1) @ self.proj)[:, :, None, None]
        return torch.tanh(h) * (0.5 + t.to(x.dtype) / T).view(-1, 1, 1, 1)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, CTX_LEN, CTX_DIM, generator=g)
    uncond = torch.randn(B, CTX_LEN, CTX_DIM, generator=g)
    return cond, uncond


def _reference(model, x_T, cond, uncond, scale, steps, *, eta, noises, prediction_type):
    """The diffusers way: one scheduler, CFG on a doubled batch (uncond first)."""
    sched = _scheduler("leading", prediction_type)
    sched.set_timesteps(steps)
    latents = x_T.clone()
    for i, t in enumerate(sched.timesteps):
        out = model(torch.cat([latents] * 2), t.expand(2 * B), context=torch.cat([uncond, cond]))
        out_u, out_c = out.chunk(2)
        out = out_u + scale.view(-1, 1, 1, 1) * (out_c - out_u)
        kwargs = {"variance_noise": noises[i]} if eta > 0 else {}
        latents = sched.step(out, t, latents, eta=eta, **kwargs).prev_sample
    return latents


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    ("eta", "parameterization"), [(0.0, "eps"), (0.5, "eps"), (0.0, "v"), (0.5, "v")]
)
def test_ddim_20_steps_matches_diffusers(eta: float, parameterization: str) -> None:
    steps, seeds = 20, [101, 202]
    model = FakeEpsModel()
    cond, uncond = _inputs()
    scale = torch.tensor([7.5, 3.0])
    abar = alphas_cumprod(make_beta_schedule("linear", T, 0.00085, 0.012))

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.cat([torch.randn(1, C, H, W, generator=g) for g in gens])
    denoiser = GuidedDenoiser(
        model,
        guidance_scale=scale,
        context=cond,
        uncond_context=uncond,
        parameterization=parameterization,
        alphas_cumprod=abar,
    )
    ts = ddim_timesteps(steps, T, "leading")
    ours = sample_ddim(denoiser, x_T, [ts] * B, abar, eta=eta, generators=gens)

    # the same noise stream: per row, x_T first, then one draw per step
    replay = [torch.Generator().manual_seed(s) for s in seeds]
    for g in replay:
        torch.randn(1, C, H, W, generator=g)
    noises = [torch.stack([torch.randn(C, H, W, generator=g) for g in replay]) for _ in range(steps)]
    prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    ref = _reference(model, x_T, cond, uncond, scale, steps, eta=eta, noises=noises, prediction_type=prediction_type)

    assert _relative_error(ours, ref) < 1e-4
    # sanity: the comparison is sensitive (a different eta is far off)
    other = sample_ddim(denoiser, x_T, [ts] * B, abar, eta=1.0 - eta, generators=[None, None])
    assert _relative_error(other, ref) > 1e-2
