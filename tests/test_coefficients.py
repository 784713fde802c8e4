"""Learned coefficient corrections of the multistep solvers (docs/method.md#learned-coefficients)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ld3.discretizations import edm_rho
from ld3.losses import l2_loss
from ld3.models.gmm import default_gmm
from ld3.sampling import sample, schedule_loss
from ld3.schedules import EDMSchedule
from ld3.solvers import SOLVER_SPECS, coefficient_shape, get_solver, unipc_bh1
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import latents_from_seeds

SCHEDULE = EDMSchedule(0.002, 80.0)
LEARNABLE = [(name, order) for name, spec in SOLVER_SPECS.items() if spec.coefficient_slots is not None
             for order in spec.orders]
DATA_PREDICTION = {"dpmpp", "unipc_bh1", "unipc_bh2"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm():
    return default_gmm()


@pytest.fixture(scope="module")
def small_gmm():
    return default_gmm(seed=1, shape=(1, 2, 2), n_components=3, n_classes=0, dtype=torch.float64)


def random_corrections(name: str, n_steps: int, order: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(coefficient_shape(name, n_steps, order), generator=generator, dtype=torch.float64)


def test_every_multistep_solver_is_learnable_and_single_step_ones_refuse():
    assert {name for name, _ in LEARNABLE} == {"ipndm", "dpmpp", "unipc_bh1", "unipc_bh2"}
    assert coefficient_shape("ipndm", 6, 3) == (6, 3)
    assert coefficient_shape("unipc_bh1", 6, 3) == (6, 7)
    with pytest.raises(ValueError, match="'heun' has no learnable coefficients"):
        coefficient_shape("heun", 6, 2)


@pytest.mark.parametrize("name, order", LEARNABLE)
def test_zero_corrections_are_bit_for_bit_the_plain_solver(gmm, name, order):
    z = latents_from_seeds(range(32), gmm.shape, torch.float64)
    sigmas = edm_rho(6, SCHEDULE)
    sigmas_eval = sigmas * torch.cat([torch.ones(1), 1.02 * torch.ones(5), torch.ones(1)]).double()
    zeros = torch.zeros(coefficient_shape(name, 6, order), dtype=torch.float64)
    plain = sample(gmm, name, order, sigmas, z, sigmas_eval=sigmas_eval)
    assert torch.equal(plain, sample(gmm, name, order, sigmas, z, sigmas_eval=sigmas_eval, coefficients=zeros))
    corrections = random_corrections(name, 6, order)
    moved = sample(gmm, name, order, sigmas, z, sigmas_eval=sigmas_eval, coefficients=corrections)
    if order > 1 or name.startswith("unipc"):  # at order 1 only UniPC's corrector (2 weights) has freedom
        assert (moved - plain).abs().max() > 1e-4
    else:
        assert torch.equal(moved, plain)


@pytest.mark.parametrize("name, order", LEARNABLE)
def test_gradcheck_wrt_coefficients_and_sigmas(small_gmm, name, order):
    x = 80.0 * latents_from_seeds([3, 4], small_gmm.shape, torch.float64)
    sigmas = edm_rho(5, SCHEDULE).requires_grad_(True)
    coefficients = random_corrections(name, 5, order, scale=0.1).requires_grad_(True)
    solver = get_solver(name)
    assert torch.autograd.gradcheck(lambda s, c: solver(small_gmm, x, s, order=order, coefficients=c),
                                    (sigmas, coefficients), eps=1e-6, atol=1e-5, rtol=1e-4)


class ConstantDenoiser:
    """D(x, σ) = m: every data-prediction solver integrates this exactly (x(σ) = m + σ/σ_0 (x_0 − m))."""

    def __init__(self, m: torch.Tensor):
        self.m = m

    def __call__(self, x, sigma, cond=None):
        return self.m.expand_as(x)


class ConstantSlope:
    """ε(x, σ) = e, i.e. D = x − σ e: Adams–Bashforth in σ integrates this exactly (x_N = x_0 + (σ_N − σ_0) e)."""

    def __init__(self, e: torch.Tensor):
        self.e = e

    def __call__(self, x, sigma, cond=None):
        return x - sigma.reshape(-1, 1, 1, 1) * self.e


@pytest.mark.parametrize("name, order", LEARNABLE)
def test_corrections_keep_first_order_consistency(name, order):
    """The zero-sum parametrisation keeps each step's weight sum, so what the plain solver integrates exactly
    (constant D for data prediction, constant ε for iPNDM) it still does with any corrections."""
    generator = torch.Generator().manual_seed(5)
    x0 = 80.0 * torch.randn(4, 1, 2, 2, generator=generator, dtype=torch.float64)
    target = torch.randn(1, 1, 2, 2, generator=generator, dtype=torch.float64)
    sigmas = edm_rho(6, SCHEDULE)
    if name in DATA_PREDICTION:
        denoiser, exact = ConstantDenoiser(target), target + sigmas[-1] / sigmas[0] * (x0 - target)
    else:
        denoiser, exact = ConstantSlope(target), x0 + (sigmas[-1] - sigmas[0]) * target
    corrections = random_corrections(name, 6, order, scale=1.0)
    out = get_solver(name)(denoiser, x0, sigmas, order=order, coefficients=corrections)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)
    unconstrained = corrections.clone()
    unconstrained[:, :] = 0.5  # the projection removes a per-step constant entirely
    plain = get_solver(name)(denoiser, x0, sigmas, order=order)
    assert torch.equal(get_solver(name)(denoiser, x0, sigmas, order=order, coefficients=unconstrained), plain)


@pytest.mark.parametrize("coefficients, match", [
    (torch.zeros(5, 2, dtype=torch.float64), r"must have shape \(5, 3\)"),
    (torch.full((5, 3), float("nan"), dtype=torch.float64), "NaN/Inf"),
    ([[0.0] * 3] * 5, "must be a torch.Tensor"),
])
def test_bad_coefficients_are_rejected(small_gmm, coefficients, match):
    x = 80.0 * latents_from_seeds([0], small_gmm.shape, torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        get_solver("ipndm")(small_gmm, x, edm_rho(5, SCHEDULE), order=3, coefficients=coefficients)


# ---- training -----------------------------------------------------------------------------------------
def teacher_data(gmm, seeds) -> TeacherData:
    z = latents_from_seeds(seeds, gmm.shape, torch.float64)
    with torch.no_grad():
        y = unipc_bh1(gmm, SCHEDULE.sigma_max * z, edm_rho(20, SCHEDULE), order=3)
    return TeacherData(z, y)


@pytest.fixture(scope="module")
def small(gmm):
    return teacher_data(gmm, range(16)), teacher_data(gmm, range(100, 116))


SHORT = LD3Config(rounds_v1=1, rounds_v2=1, train_batch_size=4, lr_coef=0.1)


def test_phase_one_alone_leaves_coefficients_zero_and_the_run_unchanged(gmm, small):
    """Coefficients are trained in phase 2 only and start at zero: phase 1 is exactly today's LD3."""
    config = dataclasses.replace(SHORT, rounds_v2=0)
    plain = train_ld3(gmm, "ipndm", 3, SCHEDULE, *small, config, nfe=4)
    learned = train_ld3(gmm, "ipndm", 3, SCHEDULE, *small, dataclasses.replace(config, learn_coefficients=True), nfe=4)
    assert plain.coefficients is None
    assert torch.equal(learned.coefficients, torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(learned.sigmas, plain.sigmas) and torch.equal(learned.sigmas_eval, plain.sigmas_eval)
    assert learned.final_val_loss == plain.final_val_loss


@pytest.mark.parametrize("solver", ["ipndm", "unipc_bh1"])
def test_learned_coefficients_are_returned_and_reproduce_the_validation_loss(gmm, small, solver):
    config = dataclasses.replace(SHORT, rounds_v1=0, rounds_v2=2, learn_coefficients=True)
    result = train_ld3(gmm, solver, 3, SCHEDULE, *small, config, nfe=4)
    assert result.coefficients.shape == coefficient_shape(solver, 4, 3)
    assert result.coefficients.dtype == torch.float64 and bool(result.coefficients.abs().max() > 0)
    _, val = small
    loss = schedule_loss(gmm, solver, 3, result.sigmas, val.z, val.y, l2_loss, sigmas_eval=result.sigmas_eval,
                         coefficients=result.coefficients)
    assert loss == pytest.approx(result.final_val_loss, rel=1e-12)
    without = schedule_loss(gmm, solver, 3, result.sigmas, val.z, val.y, l2_loss, sigmas_eval=result.sigmas_eval)
    assert without != loss


@pytest.mark.parametrize("solver, match", [
    ("heun", "has no learnable coefficients"),
    (get_solver("ipndm"), "needs the solver by name"),
])
def test_bad_coefficient_settings_are_rejected_before_training(gmm, small, solver, match):
    with pytest.raises(ValueError, match=match):
        train_ld3(gmm, solver, 2, SCHEDULE, *small, LD3Config(learn_coefficients=True), n_steps=4)


def test_config_rejects_bad_coefficient_hyperparameters():
    for fields, name in (({"lr_coef": 0.0}, "lr_coef"), ({"coef_clip": -1.0}, "coef_clip"),
                         ({"learn_coefficients": 1}, "learn_coefficients"),
                         ({"learn_coefficients": True, "cuda_graphs": True}, "cuda_graphs")):
        with pytest.raises(ValueError, match=f"LD3Config.{name}"):
            LD3Config(**fields)


# ---- export ---------------------------------------------------------------------------------------------
def _export(coefficients=None, solver="ipndm", order=3):
    from pipeline.recording.exports import build_export

    return build_export(sigmas=edm_rho(4, SCHEDULE), noise_schedule=SCHEDULE, model="gmm", solver=solver, order=order,
                        nfe=4, mode="lambda", metrics={}, config={}, teacher_cache_key="test",
                        coefficients=coefficients)


def test_export_with_coefficients_round_trips_and_samples_through_ld3(tmp_path, gmm):
    from pipeline.recording.exports import load_schedule, save_export

    coefficients = random_corrections("ipndm", 4, 3)
    loaded = load_schedule(save_export(_export(coefficients), tmp_path))
    assert torch.equal(loaded.coefficients, coefficients)
    z = latents_from_seeds(range(4), gmm.shape, torch.float64)
    expected = sample(gmm, "ipndm", 3, edm_rho(4, SCHEDULE), z, coefficients=coefficients)
    assert torch.equal(sample(gmm, loaded.solver, loaded.order, loaded.sigmas, z, coefficients=loaded.coefficients),
                       expected)


def test_export_without_coefficients_has_no_such_field(tmp_path):
    from pipeline.recording.exports import load_schedule, save_export

    path = save_export(_export(), tmp_path)
    assert "coefficients" not in path.read_text() and load_schedule(path).coefficients is None


def test_step_grid_consumers_refuse_coefficients_in_one_line():
    exported = _export(random_corrections("ipndm", 4, 3))
    for consumer in (exported.k_diffusion_sigmas, exported.comfyui_sigmas, exported.diffusers_sigmas):
        with pytest.raises(ValueError, match="carries learned solver coefficients") as err:
            consumer(ignore_decoupled=True)
        assert "\n" not in str(err.value)
    assert exported.consumer_formats()["k_diffusion_sigmas"] is None


@pytest.mark.parametrize("edit, match", [
    (lambda doc: doc.update(coefficients=[[0.0] * 3] * 3), r"coefficients must have shape \[4, 3\]"),
    (lambda doc: doc.update(coefficients=[[0.0] * 3] * 4, solver="heun", order=2, nfe=8), "has no learnable"),
])
def test_bad_coefficients_in_a_file_are_rejected_on_load(tmp_path, edit, match):
    import json

    from pipeline.recording.exports import load_schedule

    document = _export(random_corrections("ipndm", 4, 3)).to_dict()
    document.pop("consumers")
    edit(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=match):
        load_schedule(path)


@pytest.mark.slow
def test_learned_coefficients_beat_time_steps_alone_for_ipndm_at_nfe_4(gmm):
    """Issue 17's target (bench/RESULTS.md): at most 0.7x the time-steps-only validation RMSE, and a lower
    held-out RMSE on latents that neither run trains or selects on (seed 0 of bench/gmm_coefficients.py)."""
    train, val, held_out = (teacher_data(gmm, range(start, start + 200)) for start in (0, 100_000, 300_000))
    config = LD3Config(train_batch_size=8, lr1=0.02, lr2_coef=0.5, init_prior="edm_rho")
    rmse = {}
    for learn in (False, True):
        result = train_ld3(gmm, "ipndm", 3, SCHEDULE, train, val, dataclasses.replace(config, learn_coefficients=learn),
                           nfe=4)
        test = schedule_loss(gmm, "ipndm", 3, result.sigmas, held_out.z, held_out.y, l2_loss,
                             sigmas_eval=result.sigmas_eval, coefficients=result.coefficients)
        rmse[learn] = (result.final_val_loss**0.5, test**0.5)
    assert rmse[True][0] <= 0.7 * rmse[False][0], rmse
    assert rmse[True][1] < rmse[False][1], rmse
