"""Noise schedules: inverses, discrete tables, monotonicity, gradients and argument checks."""

import math

import pytest
import torch

from ld3.schedules import (
    SCHEDULES,
    EDMSchedule,
    NoiseSchedule,
    VPCosineSchedule,
    VPDiscreteSchedule,
    VPLinearSchedule,
    get_schedule,
)

ALL_SCHEDULES = sorted(SCHEDULES)
# Round-trip tolerance on t, relative to the length of the time interval.
ROUND_TRIP_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _time_grid(schedule: NoiseSchedule, dtype: torch.dtype, n: int = 2001) -> torch.Tensor:
    return torch.linspace(schedule.t_min, schedule.t_max, n, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_t_lambda_t_round_trip(name, dtype):
    schedule = get_schedule(name)
    t = _time_grid(schedule, dtype)
    lam = schedule.lambda_(t)
    assert lam.dtype == dtype
    t_back = schedule.t_from_lambda(lam)
    assert t_back.dtype == dtype
    tol = ROUND_TRIP_RTOL[dtype] * (schedule.t_max - schedule.t_min)
    assert (t_back - t).abs().max().item() < tol
    # sigma <-> t as well
    t_from_sigma = schedule.t_from_sigma(schedule.sigma(t))
    assert (t_from_sigma - t).abs().max().item() < tol


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_float32_matches_float64(name):
    schedule = get_schedule(name)
    t64 = _time_grid(schedule, torch.float64)
    rel = (schedule.sigma(t64.float()).double() / schedule.sigma(t64) - 1).abs().max().item()
    assert rel < 1e-5


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_sigma_increasing_in_t_and_range(name):
    schedule = get_schedule(name)
    t = _time_grid(schedule, torch.float64)
    sigma = schedule.sigma(t)
    assert bool((sigma[1:] > sigma[:-1]).all())
    assert sigma[0].item() == pytest.approx(schedule.sigma_min, rel=1e-12)
    assert sigma[-1].item() == pytest.approx(schedule.sigma_max, rel=1e-12)
    assert 0 < schedule.sigma_min < schedule.sigma_max


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_alpha_sigma_consistency(name):
    """lambda = -log sigma, sigma = sigma_vp / alpha, and VP schedules satisfy alpha^2 + sigma_vp^2 = 1."""
    schedule = get_schedule(name)
    t = _time_grid(schedule, torch.float64, 101)
    alpha, sigma_vp, sigma = schedule.alpha(t), schedule.sigma_vp(t), schedule.sigma(t)
    torch.testing.assert_close(sigma_vp / alpha, sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.lambda_(t), -torch.log(sigma), rtol=1e-12, atol=1e-12)
    if isinstance(schedule, EDMSchedule):
        torch.testing.assert_close(alpha, torch.ones_like(t))
        torch.testing.assert_close(sigma, t)
    else:
        torch.testing.assert_close(alpha**2 + sigma_vp**2, torch.ones_like(t), rtol=1e-12, atol=1e-12)


def test_vp_linear_matches_closed_form():
    schedule = VPLinearSchedule(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.001, 0.25, 0.5, 1.0], dtype=torch.float64)
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    torch.testing.assert_close(schedule.sigma(t), torch.sqrt(torch.exp(-2 * log_alpha) - 1))


def test_vp_cosine_matches_closed_form():
    s = 0.008
    schedule = VPCosineSchedule(s=s)
    t = torch.linspace(schedule.t_min, schedule.t_max, 11, dtype=torch.float64)
    f = lambda t: torch.cos(math.pi / 2 * (t + s) / (1 + s))  # noqa: E731
    alpha = f(t) / f(torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(schedule.alpha(t), alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.sigma(t), torch.sqrt(1 / alpha**2 - 1), rtol=1e-9, atol=0)


def _diffusers_alphas_cumprod(kind: str) -> torch.Tensor:
    """Textbook DDPM linear / Stable Diffusion scaled-linear alphas_cumprod (1000 steps)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    else:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_discrete_vp_matches_alphas_cumprod_at_integer_steps(kind, dtype):
    schedule = getattr(VPDiscreteSchedule, kind)()
    ac = _diffusers_alphas_cumprod(kind)
    k = torch.arange(1000, dtype=dtype)
    expected = torch.sqrt((1 - ac) / ac).to(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(schedule.sigma(k), expected, rtol=rtol, atol=0)
    torch.testing.assert_close(schedule.alpha(k), ac.sqrt().to(dtype), rtol=rtol, atol=0)
    # the inverse lands on the integers
    atol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(schedule.t_from_sigma(expected), k, rtol=0, atol=atol)


def test_discrete_vp_from_alphas_cumprod_equals_from_betas():
    ac = _diffusers_alphas_cumprod("linear")
    a, b = VPDiscreteSchedule(alphas_cumprod=ac), VPDiscreteSchedule.linear()
    t = torch.linspace(0, 999, 777, dtype=torch.float64)
    torch.testing.assert_close(a.sigma(t), b.sigma(t), rtol=1e-13, atol=0)


def test_discrete_vp_interpolates_lambda_linearly():
    schedule = VPDiscreteSchedule.scaled_linear()
    lam = schedule.lambda_(torch.arange(1000, dtype=torch.float64))
    t = torch.tensor([10.25, 500.5, 998.75], dtype=torch.float64)
    k = t.floor().long()
    expected = lam[k] + (t - k) * (lam[k + 1] - lam[k])
    torch.testing.assert_close(schedule.lambda_(t), expected)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_gradcheck_sigma_and_inverse(name):
    schedule = get_schedule(name)
    if isinstance(schedule, VPDiscreteSchedule):
        # away from the knots, where the piecewise-linear lambda is smooth
        t = torch.tensor([3.3, 101.5, 640.7, 998.2], dtype=torch.float64)
    else:
        fractions = torch.tensor([0.03, 0.3, 0.6, 0.97], dtype=torch.float64)
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * fractions
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(schedule.sigma, (t,))
    assert torch.autograd.gradcheck(schedule.lambda_, (t,))
    lam = schedule.lambda_(t).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(schedule.t_from_lambda, (lam,))
    sigma = schedule.sigma(t).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(schedule.t_from_sigma, (sigma,))


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_check_sigmas(name):
    schedule = get_schedule(name)
    inside = torch.tensor([schedule.sigma_max, math.sqrt(schedule.sigma_min * schedule.sigma_max), schedule.sigma_min])
    schedule.check_sigmas(inside)  # no error, float32 rounding of the endpoints tolerated
    for bad in ([schedule.sigma_max * 1.01, 1.0], [1.0, schedule.sigma_min * 0.99], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="my_sigmas"):
            schedule.check_sigmas(torch.tensor(bad, dtype=torch.float64), "my_sigmas")


def test_get_schedule():
    assert isinstance(get_schedule("edm"), EDMSchedule)
    edm = get_schedule("edm", sigma_min=0.01, sigma_max=10.0)
    assert (edm.sigma_min, edm.sigma_max) == (0.01, 10.0)
    with pytest.raises(ValueError, match="unknown schedule 'nope'.*edm"):
        get_schedule("nope")


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: EDMSchedule(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (lambda: VPLinearSchedule(beta_min=5.0, beta_max=1.0), "beta_min"),
        (lambda: VPLinearSchedule(t_min=0.0), "t_min"),
        (lambda: VPCosineSchedule(t_max=1.0), "t_max"),
        (lambda: VPCosineSchedule(s=-0.1), "s must"),
        (lambda: VPDiscreteSchedule(), "betas"),
        (lambda: VPDiscreteSchedule(betas=torch.tensor([0.1, 1.5])), "betas"),
        (lambda: VPDiscreteSchedule(alphas_cumprod=torch.tensor([0.5, 0.9])), "alphas_cumprod"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
