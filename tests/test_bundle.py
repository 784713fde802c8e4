"""Batched trials (ld3.train.LD3Bundle) on the exact GMM: K trials in one solve equal each trial run alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ld3.discretizations import edm_rho, logsnr_uniform
from ld3.models.gmm import default_gmm
from ld3.sampling import sample
from ld3.schedules import EDMSchedule
from ld3.solvers import SOLVER_SPECS, unipc_bh1
from ld3.train import (
    LD3Bundle,
    LD3Config,
    LD3Result,
    StopTraining,
    TeacherData,
    TrainingDiverged,
    train_ld3,
)
from ld3.utils import latents_from_seeds

SCHEDULE = EDMSchedule(0.002, 80.0)
NFE = 5
BASE = LD3Config(rounds_v1=1, rounds_v2=2, train_batch_size=2, val_batch_size=4, slack_coef=0.05)
# Trials that differ in every per-trial knob: learning rates, slack, patience/decay, parametrisation, prior, seed.
TRIALS = [
    BASE,
    dataclasses.replace(BASE, lr1=0.02, lr2=0.05, slack_coef=0.2, patience=1, lr_decay=0.5, seed=1,
                        accept_after_step=True),
    dataclasses.replace(BASE, lr1=0.01, mode="time", decoupled=False, slack_radius=0.0, init_prior="edm_rho", seed=2,
                        shift_lr=0.5),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm():
    return default_gmm()


def teacher_data(gmm, seeds) -> TeacherData:
    """Teacher pairs of UniPC-3 at NFE 20 on EDM's grid."""
    z = latents_from_seeds(seeds, gmm.shape, torch.float64)
    return TeacherData(z, sample(gmm, "unipc_bh1", 3, edm_rho(20, SCHEDULE), z))


@pytest.fixture(scope="module")
def data(gmm):
    return teacher_data(gmm, range(6)), teacher_data(gmm, range(100, 107))


@pytest.fixture(scope="module")
def alone(gmm, data):
    """Each trial of TRIALS trained on its own with train_ld3."""
    return [train_ld3(gmm, "unipc_bh1", 3, SCHEDULE, *data, config, nfe=NFE) for config in TRIALS]


# Float64 rounding: the grid gradient sums the same terms in another order (per-sample grids), ~1e-15 after the first
# step; RMSprop's normalised steps grow it ~10x a step, to at most 1.8e-10 after the 9 steps here (measured).
RTOL = 1e-9


def assert_same_run(batched: LD3Result, single: LD3Result) -> None:
    """Same steps, per-step losses and schedules, final schedule and loss, to float64 rounding."""
    assert batched.steps == single.steps and batched.stop_reason == single.stop_reason
    for key in ("train_loss", "val_loss", "best_val_loss", "lr1", "lr2", "shift_lr", "accepted_fraction",
                "max_slack_distance"):
        assert [getattr(m, key) for m in batched.history] == pytest.approx(
            [getattr(m, key) for m in single.history], rel=RTOL, abs=1e-14), key
    assert [m.val_on_all for m in batched.history] == [m.val_on_all for m in single.history]
    for b, s in zip(batched.history, single.history, strict=True):
        torch.testing.assert_close(b.sigmas, s.sigmas, rtol=RTOL, atol=0)
        torch.testing.assert_close(b.sigmas_eval, s.sigmas_eval, rtol=RTOL, atol=0)
    torch.testing.assert_close(batched.sigmas, single.sigmas, rtol=RTOL, atol=0)
    torch.testing.assert_close(batched.sigmas_eval, single.sigmas_eval, rtol=RTOL, atol=0)
    assert batched.final_val_loss == pytest.approx(single.final_val_loss, rel=RTOL)
    assert batched.best_val_loss == pytest.approx(single.best_val_loss, rel=RTOL)


@pytest.mark.parametrize("members", [(0,), (1, 2), (0, 1, 2), (2, 0)])
def test_each_trial_of_a_bundle_equals_the_trial_run_alone(gmm, data, alone, members):
    outcomes = LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, [TRIALS[i] for i in members], nfe=NFE).run()
    assert len(outcomes) == len(members)
    for i, outcome in zip(members, outcomes, strict=True):
        assert_same_run(outcome, alone[i])


def test_the_trials_really_differ(alone):
    """The equality above is not vacuous: the three trials learn different schedules."""
    finals = [r.final_val_loss for r in alone]
    assert len({round(f, 12) for f in finals}) == 3
    assert all(r.steps == alone[0].steps for r in alone) and all(r.history[0].shift_lr != 0 for r in alone[:2])
    assert max(r.max_slack_distance for r in alone[:2]) > 0 and alone[2].max_slack_distance == 0


class CountingDenoiser:
    """The GMM's exact denoiser, counting calls and the samples of each call."""

    def __init__(self, gmm):
        self.gmm, self.batches = gmm, []

    def __call__(self, x, sigma, cond=None):
        self.batches.append(x.shape[0])
        return self.gmm(x, sigma, cond)


def test_a_bundle_calls_the_denoiser_once_per_solver_step_for_all_trials(gmm, data):
    """K trials cost the denoiser calls of one trial, each on K times the samples."""
    calls = {}
    for k in (1, 3):
        counter = CountingDenoiser(gmm)
        config = dataclasses.replace(BASE, rounds_v2=0)
        configs = [dataclasses.replace(config, seed=s) for s in range(k)]
        LD3Bundle(counter, "unipc_bh1", 3, SCHEDULE, *data, configs, nfe=NFE).run()
        calls[k] = counter.batches
    assert len(calls[3]) == len(calls[1])
    assert calls[3] == [3 * b for b in calls[1]]


def test_a_stopped_trial_leaves_the_bundle_and_the_others_are_unchanged(gmm, data, alone):
    bundle = LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, TRIALS, nfe=NFE)
    reports = bundle.run_round()
    assert [r.trial for r in reports] == [0, 1, 2] and all(r.finished is None for r in reports)
    assert [r.step for r in reports] == [3, 3, 3] and all(math.isfinite(r.best_val_loss) for r in reports)
    bundle.stop(1, "asha")
    assert bundle.active() == [0, 2]
    stopped = bundle.outcomes()[1]
    assert stopped.stop_reason == "stopped: asha" and stopped.steps == 3
    assert stopped.best_val_loss == reports[1].best_val_loss
    reports = bundle.run_round()
    assert [r.trial for r in reports] == [0, 2]
    outcomes = bundle.run()
    assert_same_run(outcomes[0], alone[0])
    assert_same_run(outcomes[2], alone[2])
    # The stopped trial's result is its best schedule so far, scored on the original validation latents.
    z, y = data[1].z, data[1].y
    x = sample(gmm, "unipc_bh1", 3, stopped.sigmas, z, sigmas_eval=stopped.sigmas_eval)
    assert stopped.final_val_loss == pytest.approx(float((x - y).pow(2).flatten(1).mean(1).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="finished"):
        bundle.run_round()


def test_a_callback_stops_only_its_own_trial(gmm, data, alone):
    def stop_at_step_2(metrics):
        if metrics.step == 2:
            raise StopTraining("enough")

    outcomes = LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, TRIALS[:2], nfe=NFE,
                         callbacks=[[], [stop_at_step_2]]).run()
    assert outcomes[1].stop_reason == "stopped: enough" and outcomes[1].steps == 2
    assert_same_run(outcomes[0], alone[0])


class NaNAt:
    """The GMM denoiser, NaN for the samples evaluated at one exact sigma (a point of one trial's grid only),
    in every solve or only in the training solves (those that record gradients)."""

    def __init__(self, gmm, sigma: float, training_only: bool):
        self.gmm, self.sigma, self.training_only = gmm, sigma, training_only

    def __call__(self, x, sigma, cond=None):
        out = self.gmm(x, sigma, cond)
        hit = (sigma - self.sigma).abs() < 1e-9 * self.sigma
        if self.training_only and not torch.is_grad_enabled():
            return out
        return torch.where(hit.reshape(-1, 1, 1, 1), torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("training_only", [False, True])
def test_a_diverging_trial_ends_alone_and_the_others_are_unchanged(gmm, data, alone, training_only):
    """Trial 1 starts on the logSNR-uniform grid (lambda mode, no prior), which holds the poisoned sigma; trial 0
    (time mode from EDM's grid) never evaluates there. Poisoned everywhere, trial 1 ends at its first validation
    check; poisoned only in training solves, in its first training step, before any update."""
    poisoned = float(logsnr_uniform(NFE, SCHEDULE)[2])
    denoiser = NaNAt(gmm, poisoned, training_only)
    configs = [TRIALS[2], dataclasses.replace(TRIALS[0], decoupled=False)]
    outcomes = LD3Bundle(denoiser, "unipc_bh1", 3, SCHEDULE, *data, configs, nfe=NFE).run()
    assert isinstance(outcomes[1], TrainingDiverged) and outcomes[1].step == 0
    what = "the training loss" if training_only else "the validation loss"
    assert str(outcomes[1]).startswith(f"{what} became NaN/Inf")
    assert_same_run(outcomes[0], alone[2])
    with pytest.raises(TrainingDiverged):  # the same trial alone raises, as train_ld3 always has
        train_ld3(denoiser, "unipc_bh1", 3, SCHEDULE, *data, configs[1], nfe=NFE)


@pytest.mark.parametrize("field, value", [("rounds_v2", 3), ("train_batch_size", 3), ("loss", "l1"),
                                          ("val_solve_batch_size", 2), ("cuda_graphs", True)])
def test_trials_that_must_agree_are_rejected_naming_the_field(gmm, data, field, value):
    configs = [BASE, dataclasses.replace(BASE, **{field: value})]
    with pytest.raises(ValueError, match=f"LD3Config.{field} must be the same for every trial of a bundle"):
        LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, configs, nfe=NFE)


def test_bad_bundles_are_rejected(gmm, data):
    with pytest.raises(ValueError, match="non-empty sequence of LD3Config"):
        LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, [], nfe=NFE)
    with pytest.raises(ValueError, match="learn_coefficients=True needs a bundle of one trial"):
        LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, [dataclasses.replace(BASE, learn_coefficients=True), BASE],
                  nfe=NFE)
    with pytest.raises(ValueError, match="one iterable per trial"):
        LD3Bundle(gmm, "unipc_bh1", 3, SCHEDULE, *data, [BASE, BASE], nfe=NFE, callbacks=[[]])


# ---- the solvers' per-sample grids, which the bundle's one solve rests on ---------------------------------
def solver_cases():
    for name, spec in sorted(SOLVER_SPECS.items()):
        for order in spec.orders:
            yield name, order


@pytest.mark.parametrize("name, order", list(solver_cases()))
def test_per_sample_grids_equal_separate_solves(gmm, name, order):
    z = latents_from_seeds(range(4), gmm.shape, torch.float64)
    a, b = edm_rho(4, SCHEDULE), logsnr_uniform(4, SCHEDULE)
    b_eval = torch.cat([b[:1], b[1:-1] * 1.01, b[-1:]])
    coefficients = None
    if SOLVER_SPECS[name].coefficient_slots is not None:
        coefficients = 0.05 * torch.randn(4, SOLVER_SPECS[name].coefficient_slots(order), dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(0))
    options = {} if coefficients is None else {"coefficients": coefficients}
    together = sample(gmm, name, order, torch.stack([a, a, b, b]), z, sigmas_eval=torch.stack([a, a, b_eval, b_eval]),
                      batch_size=3, **options)
    first = sample(gmm, name, order, a, z[:2], **options)
    second = sample(gmm, name, order, b, z[2:], sigmas_eval=b_eval, **options)
    torch.testing.assert_close(together, torch.cat([first, second]), rtol=1e-12, atol=1e-12)


def test_per_sample_grids_are_validated(gmm):
    z = latents_from_seeds(range(2), gmm.shape, torch.float64)
    grids = torch.stack([edm_rho(4, SCHEDULE), edm_rho(4, SCHEDULE).flip(0)])
    with pytest.raises(ValueError, match=r"sigmas must decrease strictly.*\(sample 1\)"):
        sample(gmm, "unipc_bh1", 3, grids, z)
    with pytest.raises(ValueError, match=r"or one such grid per sample \[2, N\+1\]"):
        unipc_bh1(gmm, z, torch.stack([edm_rho(4, SCHEDULE)] * 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_graphed_bundle_on_cuda_trains_each_trial_like_a_graphed_run_alone(gmm, data):
    """float64 on the GPU, graphed solves: the same steps, schedules and losses to rounding (float32 rounding,
    grown by RMSprop's normalised steps, reaches ~1e-2 in a sigma of this short run: float64 makes it testable)."""
    cuda = gmm.to(device="cuda", dtype=torch.float64)
    moved = [TeacherData(d.z.to("cuda"), d.y.to("cuda")) for d in data]
    configs = [dataclasses.replace(c, cuda_graphs=True) for c in TRIALS]
    outcomes = LD3Bundle(cuda, "unipc_bh1", 3, SCHEDULE, *moved, configs, nfe=NFE).run()
    for config, outcome in zip(configs, outcomes, strict=True):
        single = train_ld3(cuda, "unipc_bh1", 3, SCHEDULE, *moved, config, nfe=NFE)
        assert outcome.steps == single.steps
        torch.testing.assert_close(outcome.sigmas, single.sigmas, rtol=1e-7, atol=0)
        assert outcome.final_val_loss == pytest.approx(single.final_val_loss, rel=1e-7)


# ---- steps 4 and 5 in one solve ---------------------------------------------------------------------------------
class SplitStep(LD3Bundle):
    """The step as it was before steps 4 and 5 shared a solve, for reference: the accept-if-better re-solve of the
    candidates before the ξ step (after it, in a second solve, for accept_after_step trials), then the check solve."""

    def _step(self, idx):
        grids, stores, totals, solved = self._training_solve(idx)
        if not totals:
            return
        later = {t: solved.pop(t) for t in list(solved) if t.config.accept_after_step}
        before = {t: tuple(g.detach() for g in grids[t]) for t in solved}
        accepted = self._judge(stores, idx, solved, self._candidates(self.train, idx, solved), before)
        for t in totals:
            t.step_parameters()
            t.step += 1
        with torch.no_grad():
            after = {t: t.disc() for t in later}
        accepted |= self._judge(stores, idx, later, self._candidates(self.train, idx, later), after)
        self._report_step(idx, totals, accepted, self._val_losses(list(totals)))


class CountingSolver:
    """UniPC-3 bh1, recording each solve's rows and whether it records gradients."""

    def __init__(self):
        self.calls = []

    def __call__(self, denoiser, x, sigmas, sigmas_eval=None, *, order, cond=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return unipc_bh1(denoiser, x, sigmas, sigmas_eval, order=order, cond=cond)


def assert_same_history(merged: LD3Result, split: LD3Result) -> None:
    """Every step's losses, accepted fraction, schedule and check width, and the result, to float64 rounding."""
    assert merged.steps == split.steps and merged.stop_reason == split.stop_reason
    for key in ("train_loss", "val_loss", "best_val_loss", "lr1", "lr2", "shift_lr", "accepted_fraction",
                "max_slack_distance", "val_on_all"):
        assert [getattr(m, key) for m in merged.history] == pytest.approx(
            [getattr(m, key) for m in split.history], rel=1e-12, abs=1e-15), key
    for a, b in zip(merged.history, split.history, strict=True):
        torch.testing.assert_close(a.sigmas, b.sigmas, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.sigmas_eval, b.sigmas_eval, rtol=1e-12, atol=0)
    assert merged.final_val_loss == pytest.approx(split.final_val_loss, rel=1e-12)
    if split.coefficients is not None:
        torch.testing.assert_close(merged.coefficients, split.coefficients, rtol=1e-12, atol=1e-15)


COEFFICIENTS = dataclasses.replace(BASE, learn_coefficients=True, patience=2, slack_coef=0.2)


@pytest.mark.parametrize("configs, solver", [
    ([TRIALS[0]], "unipc_bh1"),
    ([TRIALS[1]], "unipc_bh1"),  # accept_after_step, checks widened by patience 1
    (TRIALS, "unipc_bh1"),  # K = 3: pre-step and post-step judging and a trial without slack in one solve
    ([COEFFICIENTS], "ipndm"),  # phase 2 moves the coefficients: judged before the step, on their own
], ids=["k1", "k1-accept-after-step", "k3", "k1-coefficients"])
def test_the_merged_step_gives_the_split_steps_history(gmm, data, configs, solver):
    merged = LD3Bundle(gmm, solver, 3, SCHEDULE, *data, configs, nfe=NFE).run()
    split = SplitStep(gmm, solver, 3, SCHEDULE, *data, configs, nfe=NFE).run()
    for m, s in zip(merged, split, strict=True):
        assert_same_history(m, s)
    assert any(m.accepted_fraction > 0 for r in merged for m in r.history)  # the merged solve's losses decide


def solves_per_step(bundle_class, configs, data, gmm):
    """(rows, with gradients) of every solve of each step after the first of its round, in order."""
    solver = CountingSolver()
    at_step = []
    bundle_class(gmm, solver, 3, SCHEDULE, *data, configs, n_steps=NFE,
                 callbacks=[[lambda m: at_step.append((m.round, len(solver.calls)))]] + [[]] * (len(configs) - 1)).run()
    return [solver.calls[a[1]:b[1]] for a, b in zip(at_step, at_step[1:]) if a[0] == b[0]]


@pytest.mark.parametrize("k", [1, 3])
def test_a_step_solves_once_fewer_candidates_and_checks_together(gmm, data, k):
    """K trials with slack: a step is the training solve (with gradients) and ONE no-grad solve of every trial's
    2 candidates and 4 check rows (patience never runs out, so the checks stay on the first validation batch)."""
    configs = [dataclasses.replace(BASE, patience=100, seed=s) for s in range(k)]
    merged = solves_per_step(LD3Bundle, configs, data, gmm)
    split = solves_per_step(SplitStep, configs, data, gmm)
    assert len(merged) == len(split) >= 4
    assert all(step == [(2 * k, True), (2 * k + 4 * k, False)] for step in merged)
    assert all(step == [(2 * k, True), (2 * k, False), (4 * k, False)] for step in split)


def test_pre_and_post_step_candidates_share_the_one_solve(gmm, data):
    """TRIALS: one trial judged before the ξ step, one after it, one without slack: two solves fewer per step."""
    configs = [dataclasses.replace(c, patience=100) for c in TRIALS]
    merged = solves_per_step(LD3Bundle, configs, data, gmm)
    split = solves_per_step(SplitStep, configs, data, gmm)
    assert all(step == [(6, True), (2 + 2 + 12, False)] for step in merged)
    assert all(step == [(6, True), (2, False), (2, False), (12, False)] for step in split)


class NaNForTraining:
    """The GMM denoiser, NaN for the training samples (cond 1) in no-grad solves: only the candidates' re-solve."""

    def __init__(self, gmm):
        self.gmm = gmm

    def __call__(self, x, sigma, cond=None):
        out = self.gmm(x, sigma)
        if torch.is_grad_enabled():
            return out
        return torch.where((cond == 1).reshape(-1, 1, 1, 1), torch.full_like(out, math.nan), out)


def test_nan_candidate_losses_are_never_accepted_and_end_nothing(gmm, data):
    """A NaN candidate loss is not below the old one (NaN < x is False): no training latent moves, the checks that
    share its solve stay finite and every trial completes, exactly as with separate solves."""
    train, val = (TeacherData(d.z, d.y, torch.full((len(d),), c)) for d, c in zip(data, (1, 0), strict=True))
    denoiser = NaNForTraining(gmm)
    merged = LD3Bundle(denoiser, "unipc_bh1", 3, SCHEDULE, train, val, TRIALS[:2], nfe=NFE).run()
    split = SplitStep(denoiser, "unipc_bh1", 3, SCHEDULE, train, val, TRIALS[:2], nfe=NFE).run()
    for m, s in zip(merged, split, strict=True):
        assert m.stop_reason == "completed" and all(h.accepted_fraction == 0 for h in m.history)
        assert all(math.isfinite(h.val_loss) for h in m.history)
        assert_same_history(m, s)
