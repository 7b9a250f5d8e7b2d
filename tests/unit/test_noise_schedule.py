"""Unit tests of the beta schedules and DDIM timestep selection."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.noise_schedule import alphas_cumprod, ddim_step_count, ddim_timesteps, make_beta_schedule
from ldm_serve.errors import ConfigError, InvalidInput

SPACINGS = ("uniform", "leading", "trailing", "quad")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_linear_schedule_is_linear_in_sqrt_beta(kind: str) -> None:
    betas = make_beta_schedule(kind, 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-12)
    assert math.isclose(betas[-1].item(), 0.012, rel_tol=1e-12)
    steps = betas.sqrt().diff()
    torch.testing.assert_close(steps, steps.mean().expand(999), rtol=1e-9, atol=0)


def test_sqrt_linear_and_sqrt_schedules() -> None:
    lin = make_beta_schedule("sqrt_linear", 1000, 1e-4, 2e-2)
    torch.testing.assert_close(lin.diff(), lin.diff().mean().expand(999), rtol=1e-9, atol=0)
    assert (lin[0].item(), lin[-1].item()) == pytest.approx((1e-4, 2e-2), rel=1e-12)
    sq = make_beta_schedule("sqrt", 1000, 1e-4, 2e-2)
    torch.testing.assert_close(sq**2, lin, rtol=1e-12, atol=0)


def test_cosine_schedule_follows_squared_cosine() -> None:
    betas = make_beta_schedule("cosine", 1000, 0.0, 0.0)
    assert betas.dtype == torch.float64 and (betas >= 0).all() and (betas <= 0.999).all()
    abar = torch.cumprod(1 - betas, 0)
    s = 8e-3
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 250, 500, 900):  # away from the clipped end
        assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


def test_unknown_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="beta_schedule"):
        make_beta_schedule("quadratic", 1000, 1e-4, 2e-2)


def test_alphas_cumprod_is_float64_product_stored_as_float32() -> None:
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    abar = alphas_cumprod(betas)
    assert abar.dtype == torch.float32
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    assert (abar.diff() < 0).all()
    # a float64 running product, not a float32 one
    running = 1.0
    for b in betas.tolist()[:500]:
        running *= 1 - b
    assert abar[499].item() == pytest.approx(running, rel=1e-7)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 250])
def test_timesteps_descend_within_the_schedule(spacing: str, steps: int) -> None:
    ts = ddim_timesteps(steps, 1000, spacing)
    assert ts.dtype == torch.int64 and ts.ndim == 1
    assert (ts.diff() <= 0).all() and ts.min() >= 0 and ts.max() <= 999
    assert len(ts) == ddim_step_count(steps, 1000, spacing)
    if spacing != "uniform":
        assert len(ts) == steps


def test_uniform_spacing_is_compvis_with_plus_one() -> None:
    ts = ddim_timesteps(50)
    assert ts[0] == 981 and ts[-1] == 1 and (ts.diff() == -20).all()
    # S=15 does not divide 1000: c = 66, arange(0, 1000, 66) has 16 entries
    assert ddim_step_count(15) == 16 and ddim_timesteps(15)[0] == 991


def test_trailing_starts_at_last_training_step() -> None:
    assert ddim_timesteps(50, spacing="trailing")[0] == 999
    assert ddim_timesteps(50, spacing="trailing")[-1] == 19


def test_quad_is_quadratic_up_to_eight_tenths() -> None:
    ts = ddim_timesteps(20, spacing="quad").flip(0)
    assert ts[0] == 1 and ts[-1] == 801
    root = (ts.double() - 1).sqrt()
    # int() truncation: sqrt(t - 1) sits just below an equally spaced grid
    grid = torch.linspace(0, math.sqrt(800), 20, dtype=torch.float64)
    assert ((grid - root) >= 0).all() and ((grid**2 - (ts.double() - 1)) < 1).all()


def test_step_count_agrees_with_timesteps_everywhere() -> None:
    for spacing in SPACINGS:
        for steps in range(1, 1001, 7):
            try:
                n = len(ddim_timesteps(steps, 1000, spacing))
            except InvalidInput:
                with pytest.raises(InvalidInput):
                    ddim_step_count(steps, 1000, spacing)
                continue
            assert ddim_step_count(steps, 1000, spacing) == n


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_out_of_range_step_counts_raise(steps: int) -> None:
    with pytest.raises(InvalidInput) as info:
        ddim_timesteps(steps)
    assert info.value.field == "steps"


@pytest.mark.parametrize(("steps", "spacing"), [(3, "uniform"), (36, "uniform"), (600, "uniform"), (1000, "leading")])
def test_step_counts_that_would_index_past_the_schedule_raise(steps: int, spacing: str) -> None:
    # the +1 shift lands on t = 1000 (e.g. uniform S=3: 1, 334, 667, 1000)
    with pytest.raises(InvalidInput, match="1000"):
        ddim_timesteps(steps, 1000, spacing)


def test_unknown_spacing_and_non_integer_steps_raise() -> None:
    with pytest.raises(InvalidInput) as info:
        ddim_timesteps(10, 1000, "linspace")  # type: ignore[arg-type]
    assert info.value.field == "spacing"
    with pytest.raises(InvalidInput):
        ddim_timesteps(10.0)  # type: ignore[arg-type]
