"""Fixed baseline discretisations and LD3's learnable grid (docs/method.md)."""

import math

import pytest
import torch
from torch.func import functional_call

from ld3.discretizations import (
    BASELINES,
    LearnableDiscretization,
    edm_rho,
    from_grid_space,
    get_baseline,
    logsnr_uniform,
    time_quadratic,
    time_uniform,
    to_grid_space,
    validate_sigmas,
)
from ld3.schedules import EDMSchedule, VPDiscreteSchedule, get_schedule

SCHEDULE_NAMES = ["edm", "vp_linear", "vp_cosine", "vp_discrete_linear", "vp_discrete_scaled_linear"]
FIT_SCHEDULE_NAMES = ["edm", "vp_linear", "vp_discrete_linear"]
MODES = ["lambda", "time"]
DTYPES = [torch.float32, torch.float64]


def _assert_strictly_decreasing(sigmas: torch.Tensor) -> None:
    assert bool(torch.isfinite(sigmas).all()), sigmas
    assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas


# ---------------------------------------------------------------- fixed baselines


@pytest.mark.parametrize("n_steps", [1, 4, 10])
@pytest.mark.parametrize("baseline", sorted(BASELINES))
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_baseline_shape_order_endpoints(schedule_name, baseline, n_steps):
    schedule = get_schedule(schedule_name)
    sigmas = get_baseline(baseline)(n_steps, schedule)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (n_steps + 1,)
    _assert_strictly_decreasing(sigmas)
    assert sigmas[0].item() == schedule.sigma_max
    assert sigmas[-1].item() == schedule.sigma_min


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_baseline_custom_range(baseline):
    sigmas = get_baseline(baseline)(6, VPDiscreteSchedule.scaled_linear(), sigma_min=0.1, sigma_max=10.0)
    assert (sigmas[0].item(), sigmas[-1].item()) == (10.0, 0.1)
    _assert_strictly_decreasing(sigmas)


def test_edm_rho_matches_karras_formula():
    n, smin, smax, rho = 10, 0.002, 80.0, 7.0
    expected = [(smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n + 1)]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(edm_rho(n, EDMSchedule()), expected, rtol=1e-14, atol=0)
    # rho = 1 is sigma-uniform
    torch.testing.assert_close(edm_rho(4, EDMSchedule(), rho=1.0), torch.linspace(80, 0.002, 5, dtype=torch.float64))


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_logsnr_uniform_is_linear_in_lambda(schedule_name):
    schedule = get_schedule(schedule_name)
    steps = (-torch.log(logsnr_uniform(8, schedule))).diff()
    expected = math.log(schedule.sigma_max / schedule.sigma_min) / 8
    torch.testing.assert_close(steps, torch.full_like(steps, expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_time_baselines_follow_ddim_formulas(schedule_name):
    schedule = get_schedule(schedule_name)
    n = 7
    i = torch.arange(n + 1, dtype=torch.float64)
    t_hi, t_lo = schedule.t_max, schedule.t_min
    t_uniform = schedule.t_from_sigma(time_uniform(n, schedule))
    torch.testing.assert_close(t_uniform, t_hi + i / n * (t_lo - t_hi), rtol=0, atol=1e-9 * t_hi)
    # quadratic, measured from the small end: t = t_min + (t_max - t_min) (j / N)^2 with j = N - i
    t_quadratic = schedule.t_from_sigma(time_quadratic(n, schedule))
    torch.testing.assert_close(t_quadratic, t_lo + (t_hi - t_lo) * ((n - i) / n) ** 2, rtol=0, atol=1e-9 * t_hi)


def test_time_uniform_discrete_vp_hits_the_training_table():
    schedule = VPDiscreteSchedule.linear()
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    steps = torch.arange(999, -1, -111)  # 999, 888, ..., 0: 9 uniform steps
    expected = torch.sqrt((1 - alphas_cumprod[steps]) / alphas_cumprod[steps])
    torch.testing.assert_close(time_uniform(9, schedule), expected, rtol=1e-13, atol=0)


def test_time_uniform_edm_is_sigma_uniform():
    torch.testing.assert_close(time_uniform(5, EDMSchedule()), torch.linspace(80, 0.002, 6, dtype=torch.float64))


def test_get_baseline_unknown_name():
    with pytest.raises(ValueError, match="unknown baseline discretisation 'karras'.*edm_rho"):
        get_baseline("karras")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_steps=0), "n_steps"),
        (dict(n_steps=2.5), "n_steps"),
        (dict(n_steps=True), "n_steps"),
        (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (dict(sigma_max=1000.0), "sigma_max"),
        (dict(sigma_min=1e-5), "sigma_min"),
        (dict(sigma_min=float("nan")), "sigma_min"),
    ],
)
@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_baseline_bad_arguments(baseline, kwargs, match):
    kwargs = {"n_steps": 5, **kwargs}
    n_steps = kwargs.pop("n_steps")
    with pytest.raises(ValueError, match=match):
        get_baseline(baseline)(n_steps, EDMSchedule(), **kwargs)


@pytest.mark.parametrize("rho", [0.0, -7.0, float("inf")])
def test_edm_rho_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        edm_rho(5, EDMSchedule(), rho=rho)


def test_baseline_rejects_non_schedule():
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        time_uniform(5, "edm")


# ---------------------------------------------------------------- learnable discretisation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", ["edm", "vp_discrete_linear", "vp_linear"])
def test_learnable_strictly_decreasing_for_any_parameters(schedule_name, mode, dtype):
    schedule = get_schedule(schedule_name)
    module = LearnableDiscretization(10, schedule, mode, dtype=dtype)
    sigma_max = torch.tensor(schedule.sigma_max, dtype=dtype)
    sigma_min = torch.tensor(schedule.sigma_min, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for scale in [0.0, 1.0, 10.0, 100.0, 1e4]:
        for _ in range(5):
            with torch.no_grad():
                module.xi.copy_(scale * torch.randn(11, generator=generator, dtype=dtype))
                module.xi_c.copy_(scale * torch.randn(11, generator=generator, dtype=dtype))
            sigmas, sigmas_eval = module()
            assert sigmas.dtype == dtype and sigmas_eval.dtype == dtype
            _assert_strictly_decreasing(sigmas)
            assert sigmas[0] == sigma_max and sigmas[-1] == sigma_min
            assert sigmas_eval[0] == sigma_max and sigmas_eval[-1] == sigma_min
            # with win_rate 0.5 every evaluation point stays between the neighbouring grid points
            assert bool((sigmas_eval[1:-1] <= sigmas[:-2]).all() and (sigmas_eval[1:-1] >= sigmas[2:]).all())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_learnable_float32_matches_float64(schedule_name, mode):
    """Both ends keep float32's relative precision (time mode with t = sigma included)."""
    schedule = get_schedule(schedule_name)
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        xi = torch.randn(11, generator=generator, dtype=torch.float64)
        xi_c = 0.01 * torch.randn(11, generator=generator, dtype=torch.float64)
        outputs = []
        for dtype in DTYPES:
            module = LearnableDiscretization(10, schedule, mode, dtype=dtype)
            with torch.no_grad():
                module.xi.copy_(xi)
                module.xi_c.copy_(xi_c)
            outputs.append(torch.stack(module()).detach().double())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("win_rate", [0.1, 0.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", ["edm", "vp_discrete_scaled_linear"])
def test_learnable_eval_points_inside_window(schedule_name, mode, win_rate):
    schedule = get_schedule(schedule_name)
    module = LearnableDiscretization(8, schedule, mode, win_rate=win_rate, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        module.xi.copy_(2 * torch.randn(9, generator=generator, dtype=torch.float64))
    grid = module.grid().detach()
    window = win_rate * grid.diff().abs().min()
    random_xi_c = 1e3 * torch.randn(9, generator=generator, dtype=torch.float64)
    for xi_c in [random_xi_c, torch.full((9,), 1e6, dtype=torch.float64)]:
        with torch.no_grad():
            module.xi_c.copy_(xi_c)
            _, sigmas_eval = module()
        shift = to_grid_space(sigmas_eval, schedule, mode) - grid
        assert shift[0].item() == pytest.approx(0, abs=1e-9) and shift[-1].item() == pytest.approx(0, abs=1e-9)
        assert bool((shift.abs() <= window * (1 + 1e-9) + 1e-9).all())
        # large xi_c saturates at the window edge
        torch.testing.assert_close(shift[1:-1].abs(), window.expand(7), rtol=1e-9, atol=1e-9)


def test_learnable_lambda_mode_decoupled_points_move_at_init():
    """The reference computes the window from the raw xi (all equal at init) so it is 0; ours is not."""
    module = LearnableDiscretization(10, EDMSchedule(), "lambda")
    sigmas, sigmas_eval = module()
    torch.testing.assert_close(sigmas_eval, sigmas)  # xi_c = 0 at init
    weights = torch.linspace(1.0, 2.0, 11)
    (weights * sigmas_eval).sum().backward()
    assert bool((module.xi_c.grad[1:-1] != 0).all())
    with torch.no_grad():
        module.xi_c -= 0.1 * module.xi_c.grad
    sigmas, sigmas_eval = module()
    assert bool((sigmas_eval[1:-1] != sigmas[1:-1]).all())
    # explicit offset: xi_c = 0.2 (inside the window 0.5 * log(80/0.002)/10 = 0.53) shifts lambda by 0.2
    with torch.no_grad():
        module.xi_c.fill_(0.2)
        sigmas, sigmas_eval = module()
    torch.testing.assert_close(sigmas_eval[1:-1], sigmas[1:-1] * math.exp(-0.2))


def test_learnable_not_decoupled_returns_sigmas_twice():
    module = LearnableDiscretization(5, EDMSchedule(), decoupled=False)
    with torch.no_grad():
        module.xi_c.fill_(0.3)
    sigmas, sigmas_eval = module()
    assert sigmas_eval is sigmas


def test_learnable_init_is_uniform_in_its_space():
    schedule = VPDiscreteSchedule.linear()
    lam = LearnableDiscretization(6, schedule, "lambda", dtype=torch.float64)()[0]
    torch.testing.assert_close(lam, logsnr_uniform(6, schedule), rtol=1e-13, atol=0)
    time = LearnableDiscretization(6, schedule, "time", dtype=torch.float64)()[0]
    torch.testing.assert_close(time, time_uniform(6, schedule), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_steps", [3, 10])
@pytest.mark.parametrize("baseline", sorted(BASELINES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", FIT_SCHEDULE_NAMES)
def test_fit_to_reproduces_baselines(schedule_name, mode, baseline, n_steps):
    schedule = get_schedule(schedule_name)
    prior = get_baseline(baseline)(n_steps, schedule)
    module = LearnableDiscretization(n_steps, schedule, mode, dtype=torch.float64)
    with torch.no_grad():
        module.xi_c.fill_(0.1)
    module.fit_to(prior)
    sigmas, sigmas_eval = module()
    torch.testing.assert_close(sigmas.detach(), prior, rtol=1e-10, atol=0)
    torch.testing.assert_close(sigmas_eval.detach(), prior, rtol=1e-10, atol=0)  # fit_to resets xi_c


@pytest.mark.parametrize("mode", MODES)
def test_fit_to_float32_and_uniform_prior_gives_init(mode):
    schedule = EDMSchedule()
    prior = edm_rho(10, schedule)
    module = LearnableDiscretization(10, schedule, mode).fit_to(prior.float())
    torch.testing.assert_close(module()[0].detach().double(), prior, rtol=2e-6, atol=0)
    uniform = logsnr_uniform(10, schedule) if mode == "lambda" else time_uniform(10, schedule)
    module.fit_to(uniform)
    torch.testing.assert_close(module.xi.detach(), torch.ones(11), rtol=1e-6, atol=1e-6)


def test_from_prior_uses_the_prior_range():
    schedule = VPDiscreteSchedule.scaled_linear()
    prior = edm_rho(5, schedule, sigma_min=0.05, sigma_max=10.0)
    module = LearnableDiscretization.from_prior(prior, schedule, "time", dtype=torch.float64)
    assert (module.n_steps, module.sigma_min, module.sigma_max) == (5, 0.05, 10.0)
    torch.testing.assert_close(module()[0].detach(), prior, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", ["edm", "vp_discrete_linear"])
def test_gradients_reach_xi_and_xi_c(schedule_name, mode):
    module = LearnableDiscretization(6, get_schedule(schedule_name), mode)
    with torch.no_grad():
        module.xi.copy_(torch.tensor([0.3, 1.0, 0.5, 1.5, 0.8, 1.2, 0.9]))
    sigmas, sigmas_eval = module()
    weights = torch.arange(1.0, 8.0)
    (weights * torch.log(sigmas)).sum().backward(retain_graph=True)
    assert module.xi.grad[0] == 0  # xi_0 cancels in the normalisation
    assert bool((module.xi.grad[1:] != 0).any())
    assert module.xi_c.grad is None or bool((module.xi_c.grad == 0).all())
    module.zero_grad()
    (weights * torch.log(sigmas_eval)).sum().backward()
    assert bool((module.xi_c.grad[1:-1] != 0).all())
    assert module.xi_c.grad[0] == 0 and module.xi_c.grad[-1] == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule_name", ["edm", "vp_cosine"])
def test_gradcheck_parameters(schedule_name, mode):
    module = LearnableDiscretization(5, get_schedule(schedule_name), mode, dtype=torch.float64)
    xi = torch.tensor([1.0, 0.2, 1.3, 0.7, 1.1, 0.4], dtype=torch.float64, requires_grad=True)
    window = 0.5 * module.grid().detach().diff().abs().min().item()
    xi_c = (0.3 * window * torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 0.0], dtype=torch.float64)).requires_grad_(True)
    f = lambda xi, xi_c: functional_call(module, {"xi": xi, "xi_c": xi_c}, ())  # noqa: E731
    assert torch.autograd.gradcheck(f, (xi, xi_c))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_steps=0), "n_steps"),
        (dict(mode="sigma"), "mode"),
        (dict(win_rate=0.6), "win_rate.*cross"),
        (dict(win_rate=-0.1), "win_rate"),
        (dict(decoupled="yes"), "decoupled"),
        (dict(sigma_min=1e-4), "sigma_min"),
        (dict(dtype=torch.float16), "dtype"),
    ],
)
def test_learnable_bad_arguments(kwargs, match):
    kwargs = {"n_steps": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        LearnableDiscretization(kwargs.pop("n_steps"), EDMSchedule(), **kwargs)


def test_learnable_rejects_non_schedule():
    with pytest.raises(TypeError, match="schedule"):
        LearnableDiscretization(5, None)


@pytest.mark.parametrize(
    "prior, match",
    [
        (torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), "length n_steps \\+ 1 = 6"),
        (torch.tensor([80.0, 1.0, 2.0, 0.5, 0.1, 0.002], dtype=torch.float64), "strictly decreasing"),
        (torch.tensor([80.0, 1.0, float("nan"), 0.5, 0.1, 0.002], dtype=torch.float64), "finite"),
        (torch.tensor([70.0, 10.0, 1.0, 0.5, 0.1, 0.002], dtype=torch.float64), "sigma_max"),
        (torch.tensor([80.0, 10.0, 1.0, 0.5, 0.1, 0.01], dtype=torch.float64), "sigma_min"),
        ([80.0, 10.0, 1.0, 0.5, 0.1, 0.002], "torch.Tensor"),
    ],
)
def test_fit_to_bad_prior(prior, match):
    module = LearnableDiscretization(5, EDMSchedule())
    with pytest.raises(ValueError, match=f"sigmas_prior.*{match}|{match}.*sigmas_prior"):
        module.fit_to(prior)


def test_fit_to_step_below_float32_resolution():
    prior = torch.tensor([80.0, 1.0, 1.0 - 1e-9, 0.5, 0.1, 0.002], dtype=torch.float64)
    with pytest.raises(ValueError, match="sigmas_prior has a step.*float64"):
        LearnableDiscretization(5, EDMSchedule()).fit_to(prior)
    LearnableDiscretization(5, EDMSchedule(), dtype=torch.float64).fit_to(prior)  # representable in float64


def test_grid_space_round_trip_and_bad_space():
    schedule = VPDiscreteSchedule.linear()
    sigmas = edm_rho(6, schedule)
    for space in ["lambda", "time"]:
        back = from_grid_space(to_grid_space(sigmas, schedule, space), schedule, space)
        torch.testing.assert_close(back, sigmas, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="space must be one of"):
        to_grid_space(sigmas, schedule, "lamda")


def test_validate_sigmas():
    good = torch.tensor([80.0, 1.0, 0.002])
    assert validate_sigmas(good, length=3) is good
    cases = [(torch.ones(2, 2), "1-D"), (torch.tensor([1.0, 0.0]), "positive"), (torch.tensor([1.0, 1.0]), "decreasing")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=f"grid.*{match}"):
            validate_sigmas(bad, "grid")


def test_state_dict_repr_and_describe():
    module = LearnableDiscretization(4, EDMSchedule(), "time", win_rate=0.25)
    assert set(module.state_dict()) == {"xi", "xi_c"}
    assert "mode='time'" in repr(module) and "win_rate=0.25" in repr(module)
    text = module.describe()
    assert "sigmas      = [80, 60, 40, 20, 0.002]" in text and "sigmas_eval" in text
    restored = LearnableDiscretization(4, EDMSchedule(), "time", win_rate=0.25)
    with torch.no_grad():
        module.xi.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    restored.load_state_dict(module.state_dict())
    torch.testing.assert_close(restored()[0], module()[0])
