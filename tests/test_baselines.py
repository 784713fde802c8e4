"""GITS, DMN and AYS baselines (ld3.baselines): published values, closed forms by hand, the DP, the GMM."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ld3.baselines import (
    AYS_SIGMAS,
    GITSConfig,
    ays,
    cell_baselines,
    dmn,
    dmn_objective,
    gits,
    gits_cost_matrix,
    gits_dynamic_programming,
    named_grid,
    teacher_trajectory,
)
from ld3.catalog import BASELINE_NAMES
from ld3.discretizations import edm_rho, logsnr_uniform
from ld3.models.gmm import default_gmm
from ld3.sampling import sample
from ld3.schedules import EDMSchedule, VPDiscreteSchedule
from ld3.solvers import ipndm
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import latents_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EDM = EDMSchedule(0.002, 80.0)
SD = VPDiscreteSchedule.scaled_linear()


# ---- AYS ----------------------------------------------------------------------------------------
DIFFUSERS_KEYS = {"sd15": "StableDiffusionSigmas", "sdxl": "StableDiffusionXLSigmas", "svd": "StableDiffusionVideoSigmas"}


@pytest.mark.parametrize("model", sorted(AYS_SIGMAS))
def test_ays_lists_are_the_published_ones(model):
    from diffusers.schedulers.scheduling_utils import (
        AysSchedules,  # NVIDIA's lists, 0.0 appended for diffusers
    )

    published = AysSchedules[DIFFUSERS_KEYS[model]]
    assert len(AYS_SIGMAS[model]) == 11 and list(AYS_SIGMAS[model][:10]) == published[:10] and published[10] == 0.0


@pytest.mark.parametrize("model, schedule", [("sd15", SD), ("sdxl", SD), ("svd", EDMSchedule(0.002, 700.0))])
def test_ays_ten_steps_reproduce_the_list_with_the_exact_range_ends(model, schedule):
    grid = ays(10, schedule, model)
    assert grid.dtype == torch.float64 and (grid[0], grid[-1]) == (schedule.sigma_max, schedule.sigma_min)
    torch.testing.assert_close(grid[1:-1], torch.tensor(AYS_SIGMAS[model][1:-1], dtype=torch.float64), rtol=1e-12, atol=0)


def test_ays_interpolates_log_linearly_to_other_step_counts():
    published = torch.tensor(AYS_SIGMAS["sd15"], dtype=torch.float64)
    twenty = ays(20, SD, "sd15")
    torch.testing.assert_close(twenty[2:-1:2], published[1:-1], rtol=1e-12, atol=0)  # the published points
    torch.testing.assert_close(twenty[1::2], (published[:-1] * published[1:]).sqrt(), rtol=1e-12, atol=0)  # log midpoints
    five = ays(5, SD, "sd15")  # every other published point
    torch.testing.assert_close(five[1:-1], published[2:-2:2], rtol=1e-12, atol=0)


def test_ays_is_unavailable_for_other_models():
    with pytest.raises(ValueError, match="optimised for another model"):
        ays(10, EDM, "sd15")  # an EDM pixel model: no published list, none invented
    with pytest.raises(ValueError, match="no published AYS schedule"):
        ays(10, SD, "cifar10")
    assert "ays_sd15" not in cell_baselines(4, EDM, default_gmm(), latents_from_seeds(range(2), (3, 8, 8), torch.float64))


# ---- DMN ----------------------------------------------------------------------------------------
def _err(lam: float, power: float) -> float:
    return (1 / math.sqrt(1 + math.exp(2 * lam))) ** power * math.sqrt(1 + math.exp(-2 * lam))


def _second_order_j(lam: list[float], m: int) -> tuple[float, float]:
    """The paper's two Lagrange integrals of step m+1 (points m, m+1), written out by hand."""
    h0, h1 = lam[m + 1] - lam[m], lam[m + 2] - lam[m + 1]
    big_h0 = math.exp(h1) - 1
    big_h1 = h1 * math.exp(h1) - big_h0
    e = math.exp(lam[m + 1])
    return -e * big_h1 / h0, e * (big_h1 + h0 * big_h0) / h0


def test_dmn_objective_matches_the_closed_form_by_hand():
    lam = [-4.0, -1.0, 1.5, 6.0]  # N = 3: first-order, second-order (Euclidean norm: s < 3), first-order
    e = [_err(v, 1.0) for v in lam]
    j0, j1 = _second_order_j(lam, 0)
    expected = (abs((math.exp(lam[1]) - math.exp(lam[0])) * e[0]) + math.hypot(e[0] * j0, e[1] * j1)
                + abs((math.exp(lam[3]) - math.exp(lam[2])) * e[2]))
    assert float(dmn_objective(torch.tensor(lam, dtype=torch.float64), 1.0)) == pytest.approx(expected, rel=1e-13)

    lam = [-4.0, -1.0, 0.5, 2.0, 6.0]  # N = 4, no truncation: the second-order terms are summed per data point
    e = [_err(v, 2.0) for v in lam]
    a0, a1 = _second_order_j(lam, 0)
    b0, b1 = _second_order_j(lam, 1)
    expected = (abs((math.exp(lam[1]) - math.exp(lam[0])) * e[0]) + abs((math.exp(lam[4]) - math.exp(lam[3])) * e[3])
                + abs(e[0] * a0) + abs(e[1] * a1 + e[1] * b0) + abs(e[2] * b1))
    assert float(dmn_objective(torch.tensor(lam, dtype=torch.float64), 2.0, truncation=0)) == pytest.approx(expected, rel=1e-13)


def test_dmn_reaches_the_reference_optimiser_s_minimum():
    from scipy.optimize import LinearConstraint, minimize

    n = 4
    start, end = -math.log(EDM.sigma_max), -math.log(EDM.sigma_min)
    def objective(v):
        return float(dmn_objective(torch.tensor(np.concatenate([[start], v, [end]])), 1.0))

    ordered = np.eye(n, n - 1) - np.eye(n, n - 1, -1)  # lambda_1 - lambda_T >= 0, ..., lambda_eps - lambda_{N-1} >= 0
    bounds = np.r_[start, np.zeros(n - 2), -end]
    reference = minimize(objective, -logsnr_uniform(n, EDM).log().numpy()[1:-1], method="trust-constr",
                         constraints=[LinearConstraint(ordered, bounds, np.full(n, np.inf))])
    grid = dmn(n, EDM)
    assert (grid[0], grid[-1]) == (EDM.sigma_max, EDM.sigma_min) and bool((grid.diff() < 0).all())
    assert float(dmn_objective(-grid.log(), 1.0)) <= reference.fun * (1 + 1e-9)
    torch.testing.assert_close(grid[1:-1], torch.tensor(np.exp(-reference.x)), rtol=1e-4, atol=0)


# ---- GITS ---------------------------------------------------------------------------------------
def test_dynamic_programming_finds_the_least_weighted_path():
    gen = torch.Generator().manual_seed(0)
    m, n, coeff = 8, 3, 1.15
    cost = torch.rand((m + 1, m + 1), generator=gen, dtype=torch.float64).triu(1)
    cost[torch.ones_like(cost).tril().bool()] = math.inf

    def weighted(path):  # V = C(k0, k1) + coeff (C(k1, k2) + coeff (...))
        return sum(coeff**k * float(cost[a, b]) for k, (a, b) in enumerate(itertools.pairwise(path)))

    best = min(([0, *inner, m] for inner in itertools.combinations(range(1, m), n - 1)), key=weighted)
    assert gits_dynamic_programming(cost, n, coeff) == best
    assert gits_dynamic_programming(cost, 1, coeff) == [0, m]
    with pytest.raises(ValueError, match="fine steps"):
        gits_dynamic_programming(cost, m + 1, coeff)


def test_cost_matrix_is_the_euler_step_error_against_the_teacher():
    gmm = default_gmm()
    z = latents_from_seeds(range(3), gmm.shape, torch.float64)
    fine = edm_rho(6, EDM)
    states, directions = teacher_trajectory(gmm, fine, z)
    torch.testing.assert_close(states[-1], ipndm(gmm, fine[0] * z, fine, order=4), rtol=0, atol=0)
    torch.testing.assert_close(directions[2], (states[2] - gmm(states[2], fine[2])) / fine[2])
    cost = gits_cost_matrix(states, directions, fine, "l2")
    by_hand = (states[1] + (fine[4] - fine[1]) * directions[1] - states[4]).flatten(1).norm(dim=1).mean()
    assert float(cost[1, 4]) == pytest.approx(float(by_hand), rel=1e-12)
    assert math.isinf(cost[4, 1]) and math.isinf(cost[3, 3])
    assert float(cost[0, 6]) > float(cost[5, 6]) > 0  # the longest jump errs most, the last fine step least


def _rmse(gmm, solver, order, sigmas, z, y) -> float:
    return float((sample(gmm, solver, order, sigmas, z) - y).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def gmm_cells():
    """Validation pairs of the CPU benches' teacher (UniPC-3, NFE 20, EDM rho=7) and GITS latents."""
    gmm = default_gmm()
    z = latents_from_seeds(range(100_000, 100_200), gmm.shape, torch.float64)
    y = sample(gmm, "unipc_bh1", 3, edm_rho(20, EDM), z)
    return gmm, z, y, latents_from_seeds(range(16), gmm.shape, torch.float64)


@pytest.fixture(scope="module")
def gmm_grids(gmm_cells):
    gmm, _, _, gits_z = gmm_cells
    return {nfe: {name: named_grid(name, nfe, EDM, denoiser=gmm, z=gits_z)
                  for name in ("gits", "edm_rho", "time_uniform", "time_quadratic")} for nfe in (4, 5, 6)}


@pytest.mark.parametrize("solver, order", [("unipc_bh1", 3), ("ipndm", 4)])
def test_gits_on_the_exact_gmm_against_edm_rho(gmm_cells, gmm_grids, solver, order):
    """Measured (bench/baselines_gmm.py): GITS with the reference's defaults beats EDM rho=7 for UniPC at NFE 5
    and 6 but not at NFE 4, and never for iPNDM-4 at NFE 4-6; it always beats time-uniform and time-quadratic."""
    gmm, z, y, _ = gmm_cells
    for nfe, grids in gmm_grids.items():
        rmse = {name: _rmse(gmm, solver, order, sigmas, z, y) for name, sigmas in grids.items()}
        assert rmse["gits"] < min(rmse["time_uniform"], rmse["time_quadratic"])
        beats_edm = solver == "unipc_bh1" and nfe >= 5
        assert (rmse["gits"] < rmse["edm_rho"]) == beats_edm, rmse


def test_gits_grid_is_a_subgrid_of_the_fine_grid(gmm_cells):
    gmm, _, _, gits_z = gmm_cells
    config = GITSConfig(fine_steps=30, metric="l2", num_samples=4)
    grid = gits(gmm, 5, EDM, gits_z, config=config)
    fine = edm_rho(30, EDM)
    assert grid.numel() == 6 and (grid[0], grid[-1]) == (EDM.sigma_max, EDM.sigma_min)
    assert all(bool((fine == value).any()) for value in grid)
    with pytest.raises(ValueError, match="needs the model"):
        named_grid("gits", 5, EDM)
    with pytest.raises(ValueError, match="metric"):
        GITSConfig(metric="l1")


# ---- every baseline by name, and as LD3's prior -----------------------------------------------------
def test_cell_baselines_times_every_available_grid(gmm_cells):
    gmm, _, _, gits_z = gmm_cells
    timed = cell_baselines(4, EDM, gmm, gits_z)
    assert sorted(timed) == sorted(["time_uniform", "time_quadratic", "logsnr_uniform", "edm_rho", "dmn", "gits"])
    assert all(grid.cost_s >= 0 and grid.sigmas.shape == (5,) for grid in timed.values())
    def zero_denoiser(x, sigma, cond=None):
        return torch.zeros_like(x)

    sd_cell = cell_baselines(4, SD, zero_denoiser, torch.randn(2, 4, 2, 2, dtype=torch.float64), ays_model="sd15",
                             latent=True, gits_config=GITSConfig(fine_steps=8))
    torch.testing.assert_close(sd_cell["ays_sd15"].sigmas, ays(4, SD, "sd15"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown baseline"):
        named_grid("karras", 4, EDM)


@pytest.mark.parametrize("prior", ["dmn", "gits"])
def test_literature_baselines_are_selectable_as_the_ld3_prior(gmm_cells, prior):
    gmm, z, y, _ = gmm_cells
    data = TeacherData(z[:8], y[:8])
    expected = named_grid(prior, 4, EDM, denoiser=gmm, z=data.z)
    config = LD3Config(init_prior=prior, rounds_v1=1, rounds_v2=0, train_batch_size=8, lr1=1e-12, lr1_floor=1e-12,
                       shift_lr=0.0, decoupled=False)
    assert prior in BASELINE_NAMES
    result = train_ld3(gmm, "unipc_bh1", 3, EDM, data, data, config, n_steps=4)
    torch.testing.assert_close(result.sigmas.double(), expected, rtol=1e-6, atol=0)


def test_schedule_plot_labels_baselines_with_their_cost():
    from pipeline.recording.plots import plot_schedule

    grid = edm_rho(4, EDM)
    figure = plot_schedule(grid, None, baselines={"gits": grid * 0.9, "edm_rho": grid}, costs={"gits": 0.25})
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["baseline: edm_rho", "baseline: gits (0.25 s)"]
