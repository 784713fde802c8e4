"""ODE solvers: convergence order on the exact GMM, gradients w.r.t. both grids, NFE accounting, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ld3.discretizations import edm_rho, time_uniform
from ld3.models.gmm import default_gmm
from ld3.schedules import EDMSchedule
from ld3.solvers import SOLVER_SPECS, SOLVERS, dpmpp, get_solver, heun, nfe, solver_steps_for_nfe, unipc_bh1
from ld3.utils import latents_from_seeds

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ALL_SOLVER_ORDERS = [(name, order) for name, spec in SOLVER_SPECS.items() for order in spec.orders]
# Steps where every solver is in its asymptotic regime on the default GMM (smaller N is pre-asymptotic).
CONVERGENCE_STEPS = (80, 113, 160, 226, 320)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm():
    return default_gmm(seed=0, shape=(3, 8, 8), dtype=torch.float64)


@pytest.fixture(scope="module")
def x_start(gmm):
    return SIGMA_MAX * latents_from_seeds(range(16), gmm.shape, torch.float64)


def rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square over samples of the per-sample L2 error."""
    return float((x - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt())


def fitted_order(steps: tuple[int, ...], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(N)."""
    log_n = torch.tensor(steps, dtype=torch.float64).log()
    log_e = torch.tensor(errors, dtype=torch.float64).log()
    centred = log_n - log_n.mean()
    return float(-(centred * (log_e - log_e.mean())).sum() / (centred**2).sum())


def richardson_heun(gmm, x, grid_fn, n_steps: int, sigma_min: float) -> torch.Tensor:
    """Heun on N and 2N steps, Richardson-extrapolated (Heun's global error is C h^2 + O(h^3))."""
    grid = lambda n: grid_fn(n, EDMSchedule(), sigma_min=sigma_min, sigma_max=SIGMA_MAX)  # noqa: E731
    coarse, fine = heun(gmm, x, grid(n_steps)), heun(gmm, x, grid(2 * n_steps))
    return (4 * fine - coarse) / 3


@pytest.fixture(scope="module")
def edm_reference(gmm, x_start):
    """Exact ODE solution on [0.002, 80], checked against an independent high-order solve."""
    reference = richardson_heun(gmm, x_start, edm_rho, 1000, SIGMA_MIN)
    independent = unipc_bh1(gmm, x_start, edm_rho(1000, EDMSchedule()), order=3)
    return reference, rms_error(independent, reference)


@pytest.fixture(scope="module")
def uniform_reference(gmm, x_start):
    """Exact ODE solution on [10, 80] (where sigma-uniform grids resolve the GMM), checked likewise."""
    reference = richardson_heun(gmm, x_start, time_uniform, 500, 10.0)
    independent = dpmpp(gmm, x_start, time_uniform(1000, EDMSchedule(), sigma_min=10.0, sigma_max=SIGMA_MAX), order=3)
    return reference, rms_error(independent, reference)


# (solver, order, expected order, tolerance). UniPC-p with its corrector gains one order. The tolerances
# cover the spread of the fitted slopes over other GMM seeds and latent sets (measured: orders >= 3 vary
# by about +-0.3 in this window). UniPC's order-1 final step (lower_order_final, no corrector) would
# cap its order at 2 below errors of ~1e-6, under the window.
EDM_GRID_ORDERS = [
    ("euler", 1, 1, 0.1),
    ("heun", 2, 2, 0.1),
    ("dpm_solver_2", 2, 2, 0.1),
    ("dpmpp", 1, 1, 0.1),
    ("dpmpp", 2, 2, 0.1),
    ("dpmpp", 3, 3, 0.3),
    ("unipc_bh1", 1, 2, 0.1),
    ("unipc_bh1", 2, 3, 0.35),
    ("unipc_bh1", 3, 4, 0.35),
    ("unipc_bh2", 1, 2, 0.1),
    ("unipc_bh2", 2, 3, 0.35),
    ("unipc_bh2", 3, 4, 0.35),
]


@pytest.mark.parametrize("name, order, expected, tolerance", EDM_GRID_ORDERS)
def test_convergence_order_on_edm_grid(gmm, x_start, edm_reference, name, order, expected, tolerance):
    solver = get_solver(name)
    reference, reference_error = edm_reference
    errors = [
        rms_error(solver(gmm, x_start, edm_rho(n, EDMSchedule()), order=order), reference) for n in CONVERGENCE_STEPS
    ]
    assert min(errors) > 10 * reference_error, "errors must stay well above the reference's own error"
    measured = fitted_order(CONVERGENCE_STEPS, errors)
    print(f"{name} order {order}: slope {measured:.2f} (expected {expected})")
    assert abs(measured - expected) <= tolerance, f"{name} order {order}: slope {measured:.2f}, errors {errors}"


# iPNDM's fixed Adams-Bashforth coefficients assume equal steps: its order shows on a sigma-uniform grid
# (docs/method.md#solvers). Its lower-order warm start adds an O(h^2) term that is tiny when starting at sigma = 80
# but caps the asymptotic order, so order 4 reads slightly low here (~3.7).
@pytest.mark.parametrize("order, tolerance", [(1, 0.1), (2, 0.15), (3, 0.25), (4, 0.45)])
def test_ipndm_convergence_order_on_uniform_grid(gmm, x_start, uniform_reference, order, tolerance):
    grid = lambda n: time_uniform(n, EDMSchedule(), sigma_min=10.0, sigma_max=SIGMA_MAX)  # noqa: E731
    reference, reference_error = uniform_reference
    errors = [rms_error(SOLVERS["ipndm"](gmm, x_start, grid(n), order=order), reference) for n in CONVERGENCE_STEPS]
    assert min(errors) > 10 * reference_error, "errors must stay well above the reference's own error"
    measured = fitted_order(CONVERGENCE_STEPS, errors)
    print(f"ipndm order {order}: slope {measured:.2f} (expected {order})")
    assert abs(measured - order) <= tolerance, f"ipndm order {order}: slope {measured:.2f}, errors {errors}"


# ---- gradients, decoupled timesteps, NFE ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_gmm():
    return default_gmm(seed=1, shape=(1, 2, 2), n_components=3, n_classes=0, dtype=torch.float64)


def small_problem(small_gmm, n_steps: int = 5):
    x = SIGMA_MAX * latents_from_seeds([3, 4], small_gmm.shape, torch.float64)
    sigmas = edm_rho(n_steps, EDMSchedule())
    # An evaluation grid shifted off the step grid in the interior (endpoints kept), as LD3 learns it.
    shift = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64).sin() * 0.05
    shift[0] = shift[-1] = 0
    sigmas_eval = sigmas * torch.exp(shift)
    return x, sigmas, sigmas_eval


@pytest.mark.parametrize("name, order", ALL_SOLVER_ORDERS)
def test_gradcheck_wrt_x_sigmas_and_sigmas_eval(small_gmm, name, order):
    x, sigmas, sigmas_eval = small_problem(small_gmm)
    solver = get_solver(name)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, sigmas, sigmas_eval))
    assert torch.autograd.gradcheck(
        lambda x_, s, s_eval: solver(small_gmm, x_, s, s_eval, order=order), inputs, eps=1e-6, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("name, order", ALL_SOLVER_ORDERS)
def test_every_interior_step_point_receives_a_gradient(small_gmm, name, order):
    x, sigmas, _ = small_problem(small_gmm)
    sigmas = sigmas.clone().requires_grad_(True)
    get_solver(name)(small_gmm, x, sigmas, order=order).square().sum().backward()
    assert bool((sigmas.grad[1:-1] != 0).all()), sigmas.grad


@pytest.mark.parametrize("name, order", ALL_SOLVER_ORDERS)
def test_sigmas_eval_none_is_bit_identical_to_sigmas_eval_equal_sigmas(small_gmm, name, order):
    x, sigmas, _ = small_problem(small_gmm)
    solver = get_solver(name)
    implicit = solver(small_gmm, x, sigmas, order=order)
    assert torch.equal(implicit, solver(small_gmm, x, sigmas, sigmas.clone(), order=order))


@pytest.mark.parametrize("name, order", ALL_SOLVER_ORDERS)
def test_shifted_evaluation_points_change_the_result(small_gmm, name, order):
    x, sigmas, sigmas_eval = small_problem(small_gmm)
    solver = get_solver(name)
    shifted = solver(small_gmm, x, sigmas, sigmas_eval, order=order)
    assert (shifted - solver(small_gmm, x, sigmas, order=order)).abs().max() > 1e-6


def test_first_order_solvers_agree_ddim_is_euler_in_edm_form(small_gmm):
    x, sigmas, _ = small_problem(small_gmm, n_steps=8)
    euler_result = SOLVERS["euler"](small_gmm, x, sigmas)
    torch.testing.assert_close(SOLVERS["dpmpp"](small_gmm, x, sigmas, order=1), euler_result, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SOLVERS["ipndm"](small_gmm, x, sigmas, order=1), euler_result, rtol=1e-12, atol=1e-12)


class CountingDenoiser:
    """Wraps a denoiser, counts its calls and checks the sigma it receives ([B], x's dtype)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls += 1
        return self.denoiser(x, sigma, cond)


@pytest.mark.parametrize("name, order", ALL_SOLVER_ORDERS)
@pytest.mark.parametrize("n_steps", [1, 2, 3, 4, 7, 12])
def test_nfe_counts_denoiser_calls_exactly(small_gmm, name, order, n_steps):
    x, _, _ = small_problem(small_gmm)
    counter = CountingDenoiser(small_gmm)
    get_solver(name)(counter, x, edm_rho(n_steps, EDMSchedule()), order=order)
    assert counter.calls == nfe(name, n_steps, order)
    assert solver_steps_for_nfe(name, counter.calls) == n_steps


def test_nfe_is_honest_about_two_stage_solvers():
    assert nfe("heun", 5, 2) == nfe("dpm_solver_2", 5) == 10
    assert nfe("unipc_bh2", 5, 3) == nfe("ipndm", 5, 4) == nfe("dpmpp", 5, 2) == 5
    with pytest.raises(ValueError, match="nfe=7 is impossible for heun"):
        solver_steps_for_nfe("heun", 7)
    with pytest.raises(ValueError, match="nfe=0"):
        solver_steps_for_nfe("euler", 0)
    with pytest.raises(ValueError, match="n_steps"):
        nfe("euler", 0)
    with pytest.raises(ValueError, match="order=4"):
        nfe("unipc_bh1", 5, 4)


def test_float32_input_is_solved_in_float32(small_gmm):
    x, sigmas, sigmas_eval = small_problem(small_gmm)
    gmm32 = small_gmm.to(dtype=torch.float32)
    for name, order in ALL_SOLVER_ORDERS:
        out = get_solver(name)(CountingDenoiser(gmm32), x.float(), sigmas, sigmas_eval, order=order)
        reference = get_solver(name)(small_gmm, x, sigmas, sigmas_eval, order=order)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)


def test_class_conditioning_is_passed_to_the_denoiser():
    gmm = default_gmm(seed=0, shape=(1, 2, 2), n_components=4, n_classes=2)
    x = SIGMA_MAX * latents_from_seeds([0, 1], gmm.shape, torch.float64)
    sigmas = edm_rho(6, EDMSchedule())
    class_0 = unipc_bh1(gmm, x, sigmas, cond=torch.tensor([0, 0]))
    class_1 = unipc_bh1(gmm, x, sigmas, cond=torch.tensor([1, 1]))
    assert (class_0 - class_1).abs().max() > 1e-3


# ---- bad input -----------------------------------------------------------------------------------

GOOD_SIGMAS = torch.tensor([80.0, 10.0, 1.0, 0.002], dtype=torch.float64)


@pytest.mark.parametrize(
    "sigmas, match",
    [
        (GOOD_SIGMAS[None], "sigmas must be a 1-D tensor"),
        (GOOD_SIGMAS[:1], "sigmas must be a 1-D tensor"),
        (torch.tensor([80.0, 1.0, 1.0, 0.002], dtype=torch.float64), r"sigmas must decrease strictly.*sigmas\[2\]"),
        (GOOD_SIGMAS.flip(0), "sigmas must decrease strictly"),
        (torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=torch.float64), "sigmas must be finite and > 0"),
        (torch.tensor([80.0, 10.0, -1.0, -2.0], dtype=torch.float64), "sigmas must be finite and > 0"),
        (torch.tensor([math.nan, 10.0, 1.0, 0.002], dtype=torch.float64), "sigmas must be finite and > 0"),
        (torch.tensor([math.inf, 10.0, 1.0, 0.002], dtype=torch.float64), "sigmas must be finite and > 0"),
    ],
)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_bad_sigmas_are_rejected(small_gmm, name, sigmas, match):
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        get_solver(name)(small_gmm, x, sigmas)


def test_grid_that_collapses_in_x_dtype_is_rejected(small_gmm):
    sigmas = torch.tensor([80.0, 1.0 + 1e-12, 1.0, 0.002], dtype=torch.float64)  # decreasing in float64 only
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sigmas must decrease strictly.*torch.float32"):
        SOLVERS["dpmpp"](small_gmm.to(dtype=torch.float32), x, sigmas)


@pytest.mark.parametrize(
    "sigmas_eval, match",
    [
        (GOOD_SIGMAS[:-1], "sigmas_eval must have the shape of sigmas"),
        (torch.tensor([80.0, 10.0, math.nan, 0.002], dtype=torch.float64), "sigmas_eval must be finite and > 0"),
        (torch.tensor([80.0, 10.0, 0.0, 0.002], dtype=torch.float64), "sigmas_eval must be finite and > 0"),
    ],
)
def test_bad_sigmas_eval_is_rejected(small_gmm, sigmas_eval, match):
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float64)
    for name in SOLVERS:
        with pytest.raises(ValueError, match=match):
            get_solver(name)(small_gmm, x, GOOD_SIGMAS, sigmas_eval)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_x_is_rejected(small_gmm, bad):
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float64)
    x[1, 0, 0, 0] = bad
    for name in SOLVERS:
        with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
            get_solver(name)(small_gmm, x, GOOD_SIGMAS)


@pytest.mark.parametrize(
    "name, order",
    [
        ("euler", 2),
        ("heun", 1),
        ("dpm_solver_2", 3),
        ("dpmpp", 4),
        ("unipc_bh1", 0),
        ("unipc_bh2", 4),
        ("ipndm", 5),
        ("ipndm", 2.0),
        ("dpmpp", True),
    ],
)
def test_unsupported_order_is_rejected(small_gmm, name, order):
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"order={order!r} is not supported by {name}; choose one of"):
        get_solver(name)(small_gmm, x, GOOD_SIGMAS, order=order)


def test_unknown_solver_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'unipc'.*'dpm_solver_2'.*'unipc_bh1'"):
        get_solver("unipc")


def test_non_tensor_grid_is_a_type_error(small_gmm):
    x = torch.randn(2, *small_gmm.shape, dtype=torch.float64)
    with pytest.raises(TypeError, match="sigmas must be a torch.Tensor"):
        SOLVERS["euler"](small_gmm, x, [80.0, 1.0])
