"""A study that learns solver coefficients (issue 17) and the evaluation stage's baseline set (issue 18), for real:
local Ray, SQLite MLflow, the Parquet teacher cache, exported JSON, the diffusers scheduler and the export CLI."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from ld3.baselines import study_baseline_names
from ld3.losses import get_loss
from ld3.metrics import frechet_distance
from ld3.models.gmm import default_gmm
from ld3.sampling import sample, schedule_loss
from ld3.solvers import coefficient_shape
from ld3.train import LD3Config
from ld3.utils import latents_from_seeds
from pipeline.cli import apply_overrides, build_parser
from pipeline.consumers.diffusers_scheduler import LD3Scheduler
from pipeline.driver import StudyOptions, run_study
from pipeline.evaluation.report import format_evaluation_table
from pipeline.evaluation.targets import FD_EXACT, LEARNED, EvaluationConfig, ScheduleTarget, targets_from_exports
from pipeline.export_cli import main as export_cli
from pipeline.models.spec import gmm_spec
from pipeline.recording.exports import load_schedule
from pipeline.search.space import SearchSpace, SolverChoice, hyperparameters_to_config
from pipeline.teacher.cache import TeacherCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import gmm as gmm_study  # noqa: E402

EVAL_SAMPLES = 64


@pytest.fixture(scope="module")
def study_run(local_ray, tmp_path_factory):
    """One smoke-size GMM study (iPNDM-3, NFE 4, one trial) with learned coefficients on and the evaluation stage."""
    root = tmp_path_factory.mktemp("coef-study")
    smoke = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    # From EDM rho=7, on these 10 + 10 pairs, phase 2 moves the coefficients and the result beats every baseline
    # (from DMN, the best baseline here, the coefficients never beat phase 1's time steps on validation).
    study = replace(smoke, name="coef-smoke", solvers=(SolverChoice("ipndm", 3),), num_trials=1, max_concurrent=1,
                    trainer=replace(smoke.trainer, init_prior="edm_rho"),
                    search=replace(smoke.search, learn_coefficients=(True,), lr_coef=(0.2, 0.2), decoupled=(False,),
                                   inits=("uniform",)),
                    evaluation=EvaluationConfig(num_samples=EVAL_SAMPLES, batch_size=EVAL_SAMPLES, grid_size=0))
    options = StudyOptions(tracking_uri=f"sqlite:///{root}/mlflow.db", cache_dir=str(root / "cache"),
                           exports_dir=str(root / "exports"), storage_dir=str(root / "tune"), work_dir=str(root),
                           progress=False)
    return study, options, run_study(study, options)


def test_the_trial_records_the_option_and_the_export_carries_its_coefficients(study_run):
    study, options, result = study_run
    (cell,) = result.cells
    assert cell.learned_wins, cell  # otherwise the export is a baseline grid, without coefficients
    client = MlflowClient(options.tracking_uri)
    (trial,) = client.search_runs([result.experiment_id], "tags.kind = 'trial'")
    assert trial.data.params["learn_coefficients"] == "true"
    assert float(trial.data.params["lr_coef"]) == pytest.approx(0.2)
    assert "coefficients.json" in {a.path for a in client.list_artifacts(trial.info.run_id)}

    exported = load_schedule(cell.export_path)  # validated on load, coefficients included
    assert exported.source == "learned" and exported.provenance.mlflow_run_id == trial.info.run_id
    assert exported.provenance.config["learn_coefficients"] is True
    assert tuple(exported.coefficients.shape) == coefficient_shape("ipndm", 4, 3)
    assert bool(exported.coefficients.abs().sum() > 0)  # phase 2 moved them away from the plain solver


def test_the_export_sampled_with_ld3_reproduces_the_trials_validation_loss(study_run):
    study, options, result = study_run
    (cell,) = result.cells
    exported = load_schedule(cell.export_path)
    _, val = TeacherCache(options.cache_dir).lookup(study.model, study.teacher).load().split(study.num_train,
                                                                                             study.num_validation)
    gmm = default_gmm(seed=0, dtype=torch.float32)
    loss = lambda coefficients: schedule_loss(gmm, exported.solver, exported.order, exported.sigmas, val.z, val.y,  # noqa: E731
                                              get_loss("l2"), sigmas_eval=exported.sigmas_eval, coefficients=coefficients)
    logged = MlflowClient(options.tracking_uri).get_run(cell.best["mlflow_run_id"]).data.metrics["final_val_loss"]
    assert math.isclose(loss(exported.coefficients), logged, rel_tol=1e-5)
    assert not math.isclose(loss(None), logged, rel_tol=1e-3)  # the coefficients are part of the schedule


def test_the_diffusers_scheduler_reproduces_ld3_sampling_with_the_coefficients(study_run):
    exported_path = study_run[2].cells[0].export_path
    exported = load_schedule(exported_path)
    gmm = default_gmm(seed=0, dtype=torch.float64)
    scheduler = LD3Scheduler.from_export(exported_path, prediction_type="sample")  # EDM: the network's time is σ
    z = latents_from_seeds(range(8), gmm.shape, torch.float64)
    x = z * scheduler.init_noise_sigma
    scheduler.set_timesteps(exported.n_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(gmm(x, t.expand(x.shape[0])), t, x).prev_sample
    expected = sample(gmm, exported.solver, exported.order, exported.sigmas, z, sigmas_eval=exported.sigmas_eval,
                      coefficients=exported.coefficients)
    assert float((x - expected).norm() / expected.norm()) < 1e-5
    plain = sample(gmm, exported.solver, exported.order, exported.sigmas, z, sigmas_eval=exported.sigmas_eval)
    assert float((plain - expected).norm() / expected.norm()) > 1e-4


@pytest.mark.parametrize("command, consumer", [
    (["convert", "--to", "k-diffusion"], "k-diffusion samplers"),
    (["convert", "--to", "comfyui"], "ComfyUI custom sigmas"),
    (["convert", "--to", "diffusers-sigmas"], "diffusers' built-in schedulers"),
    (["interpolate", "--steps", "6"], "interpolation"),
])
def test_consumers_that_cannot_apply_coefficients_refuse_in_one_line(study_run, tmp_path, capsys, command, consumer):
    path = study_run[2].cells[0].export_path
    capsys.readouterr()
    code = export_cli([command[0], path, *command[1:], *(["--output-dir", str(tmp_path)] if command[0] == "convert"
                                                         else ["--output", str(tmp_path / "resized.json")])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "coefficients" in err and consumer in err, err
    assert "LD3Scheduler" in err and "ld3.sampling.sample" in err  # what to use instead
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_evaluation_scores_every_baseline_of_the_study_and_the_learned_coefficients(study_run):
    study, _, result = study_run
    (cell,) = result.cells
    by_name = {e.target.name: e for e in result.evaluation.schedules}
    assert set(by_name) == {LEARNED, *study_baseline_names(None)} == {LEARNED, *cell.baselines}  # GITS, DMN: no AYS
    for name, measured in cell.baselines.items():  # the very grids the study's table compared against
        assert by_name[name].target.sigmas.tolist() == measured["sigmas"]
    table = format_evaluation_table(result.evaluation)
    assert "gits" in table and "dmn" in table

    # The learned schedule was sampled with its coefficients: the same number in-process, not the plain solver's.
    learned = by_name[LEARNED]
    gmm = default_gmm(seed=0, dtype=torch.float32)
    z = latents_from_seeds(study.evaluation.sample_seeds(), gmm.shape, torch.float32)
    x = sample(gmm, cell.solver.name, cell.solver.order, learned.target.sigmas, z,
               coefficients=learned.target.coefficients).double().flatten(1)
    exact = frechet_distance(x.mean(0), torch.cov(x.T), gmm.mean().double(), gmm.covariance().double())
    assert learned.target.coefficients is not None
    assert math.isclose(learned.metrics[FD_EXACT], exact, rel_tol=1e-4)


# --- the search space, no Ray ------------------------------------------------------------------------------


def test_the_search_space_searches_the_option_and_its_learning_rate():
    space = SearchSpace(learn_coefficients=(False, True), lr_coef=(0.05, 0.5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        space.suggest(trial)
        learn = trial.params["learn_coefficients"]
        seen.add(learn)
        assert ("lr_coef" in trial.params) == learn  # its learning rate exists only when the option is on
        config = hyperparameters_to_config(trial.params, LD3Config(), best_baseline="edm_rho")
        assert config.learn_coefficients == learn
        if learn:
            assert 0.05 <= config.lr_coef <= 0.5 and config.lr_coef == trial.params["lr_coef"]
    assert seen == {False, True}


def test_bad_coefficient_options_are_one_line_errors_before_anything_runs():
    with pytest.raises(ValueError, match=r"SearchSpace.learn_coefficients must be"):
        SearchSpace(learn_coefficients=())
    with pytest.raises(ValueError, match=r"SearchSpace.lr_coef must be"):
        SearchSpace(lr_coef=(0.0, 1.0))
    smoke = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    with pytest.raises(ValueError, match=r"learn_coefficients includes True, but solver 'heun' has no learnable") as err:
        replace(smoke, solvers=(SolverChoice("heun", 2),), search=SearchSpace(learn_coefficients=(False, True)))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cuda_graphs"):
        replace(smoke, trainer=replace(smoke.trainer, cuda_graphs=True), search=SearchSpace(learn_coefficients=(True,)))


def test_the_command_line_flag_sets_the_option():
    parser = build_parser("test", defaults=gmm_study.STUDY)
    assert "(default: off)" in parser.format_help()
    base = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    assert apply_overrides(base, parser.parse_args([])).search.learn_coefficients == (False,)
    searched = apply_overrides(base, parser.parse_args(["--learn-coefficients", "search"]))
    assert searched.search.learn_coefficients == (False, True) and searched.search.lr_coef == base.search.lr_coef
    with pytest.raises(ValueError, match="'heun' has no learnable coefficients"):
        apply_overrides(base, parser.parse_args(["--learn-coefficients", "on", "--solvers", "heun:2"]))


def test_evaluating_the_exports_afterwards_takes_the_grids_the_study_logged(study_run):
    study, options, result = study_run
    (cell,) = result.cells
    folder = Path(cell.export_path).parent
    with_runs = {t.name: t for t in targets_from_exports(folder, client=MlflowClient(options.tracking_uri))}
    assert set(with_runs) == {LEARNED, *cell.baselines}
    assert with_runs["gits"].sigmas.tolist() == cell.baselines["gits"]["sigmas"]
    assert with_runs["gits"].mlflow_run_id == cell.baselines["gits"]["mlflow_run_id"]
    assert with_runs[LEARNED].coefficients is not None
    alone = {t.name: t for t in targets_from_exports(folder)}  # no tracking server: GITS cannot be rebuilt
    assert set(alone) == {LEARNED, *cell.baselines} - {"gits"} and alone["dmn"].sigmas is None


def test_baseline_targets_name_a_known_baseline_and_gits_needs_the_studys_grid():
    assert EvaluationConfig(baselines=("gits", "dmn", "ays_sd15")).baselines == ("gits", "dmn", "ays_sd15")
    with pytest.raises(ValueError, match="unknown baseline 'nosuch'"):
        ScheduleTarget("m", "ipndm", 3, 4, "nosuch")
    with pytest.raises(ValueError, match="give the study's GITS grid"):
        ScheduleTarget("m", "ipndm", 3, 4, "gits")
    with pytest.raises(ValueError, match="a baseline has no sigmas_eval or coefficients"):
        ScheduleTarget("m", "ipndm", 3, 4, "dmn", coefficients=torch.zeros(4, 3))
    dmn = ScheduleTarget("m", "ipndm", 3, 4, "dmn")  # data-free: the worker builds it from the noise schedule
    sigmas, _ = dmn.grid(gmm_spec(seed=0).build(dtype=torch.float64).schedule)
    assert sigmas.shape == (5,) and bool((sigmas.diff() < 0).all())
