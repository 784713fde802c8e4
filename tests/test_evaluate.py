"""pipeline.evaluation.sampling: statistics independent of the split over actors and batches (and equal to an in-process
computation), the FID path with a randomly initialised Inception network, recording into MLflow and the
exported JSON, the CLI flags, and bad input caught before any sampling."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from ld3.discretizations import edm_rho, time_uniform
from ld3.fid import STATE_DICT_FILE, FeatureStats, FeatureStatsAccumulator, FIDInceptionV3, load_inception
from ld3.losses import MissingWeightsError
from ld3.metrics import gmm_frechet_distance
from ld3.models.gmm import default_gmm
from ld3.sampling import sample
from ld3.schedules import EDMSchedule
from ld3.utils import latents_from_seeds
from pipeline.cli import apply_overrides, build_parser
from pipeline.evaluation.report import format_evaluation_table, record_evaluation
from pipeline.evaluation.sampling import check_evaluation, evaluate_schedules
from pipeline.evaluation.targets import GRID_ARTIFACT, LEARNED, EvaluationConfig, ScheduleTarget, targets_from_exports
from pipeline.evaluation.workers import exact_moments
from pipeline.models.registry import build_gmm, register_model_builder
from pipeline.models.spec import ModelSpec, gmm_spec
from pipeline.recording.exports import build_export, load_schedule, save_export
from pipeline.recording.runs import StudyTracker, TrialLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import gmm as gmm_study  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # builders defined here reach the Ray actors
SPEC = gmm_spec(seed=0)
IDENTITY = {"model": SPEC.model_id, "solver": "euler", "order": 1, "nfe": 4, "teacher_cache_key": "k" * 64}
N = 200  # above the GMM's data dimension 3*8*8 = 192, so the data covariance has full rank


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory):
    """A study's MLflow records as the study leaves them: a trial run and a baseline run of one cell, and
    the trial's exported schedule."""
    root = tmp_path_factory.mktemp("study")
    tracker = StudyTracker.open("eval-test", tracking_uri=f"sqlite:///{root}/mlflow.db")
    with TrialLogger.start(tracker.context, kind="trial", key="t1", **IDENTITY) as trial:
        pass
    with TrialLogger.start(tracker.context, kind="baseline", key="edm_rho", **IDENTITY) as baseline:
        pass
    exported = build_export(sigmas=time_uniform(4, EDMSchedule()), noise_schedule=EDMSchedule(), model=SPEC.model_id,
                            solver="euler", order=1, nfe=4, mode="lambda", metrics={"final_val_loss": 0.25}, config={},
                            teacher_cache_key=IDENTITY["teacher_cache_key"], mlflow_run_id=trial.run_id, study="eval-test")
    export_path = save_export(exported, root / "exports")
    return tracker, trial.run_id, baseline.run_id, export_path


@pytest.fixture(scope="module")
def targets(study_runs):
    tracker, *_ = study_runs
    return targets_from_exports(study_runs[3].parent, model=SPEC.model_id, client=tracker.client, baselines=("edm_rho",))


@pytest.fixture(scope="module")
def evaluated(local_ray, targets):
    """All samples of each schedule in one batch on one actor, float64."""
    config = EvaluationConfig(num_samples=N, batch_size=N, device_batch_size=N, concurrency=1, grid_size=3,
                              baselines=("edm_rho",))
    return evaluate_schedules(SPEC, targets, config, dtype=torch.float64, show_progress=False)


def test_targets_from_exports_find_the_baseline_runs_of_the_cell(study_runs, targets):
    _, trial_id, baseline_id, export_path = study_runs
    assert [t.name for t in targets] == [LEARNED, "edm_rho"]
    assert targets[0].mlflow_run_id == trial_id and targets[0].export_path == str(export_path)
    assert targets[1].mlflow_run_id == baseline_id and targets[1].sigmas is None


def test_statistics_do_not_depend_on_the_split_and_match_an_in_process_computation(evaluated, targets):
    config = replace(evaluated.config, batch_size=37, device_batch_size=8, concurrency=2)
    split = evaluate_schedules(SPEC, targets, config, dtype=torch.float64, show_progress=False)
    for whole, parts in zip(evaluated.schedules, split.schedules):
        assert parts.metrics["eval_num_samples"] == whole.metrics["eval_num_samples"] == N
        torch.testing.assert_close(parts.data_stats.mu, whole.data_stats.mu, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(parts.data_stats.sigma, whole.data_stats.sigma, rtol=1e-12, atol=1e-14)
        assert parts.metrics["eval_fd_exact"] == pytest.approx(whole.metrics["eval_fd_exact"], rel=1e-10)
        assert torch.equal(parts.grid, whole.grid) and whole.grid.shape == (9, 3, 8, 8)
    assert len(split.nodes) == 1 and len(split.schedules[0].nodes) == 1  # one node, though two actors

    gmm = default_gmm(seed=0, dtype=torch.float64)
    z = latents_from_seeds(evaluated.config.sample_seeds(), gmm.shape, torch.float64)
    for evaluation, sigmas in zip(evaluated.schedules, (time_uniform(4, EDMSchedule()), edm_rho(4, EDMSchedule()))):
        x = sample(gmm, "euler", 1, sigmas, z)
        assert evaluation.metrics["eval_fd_exact"] == pytest.approx(gmm_frechet_distance(x, gmm), rel=1e-9)
    fd_learned, fd_edm = (e.metrics["eval_fd_exact"] for e in evaluated.schedules)
    assert fd_learned != pytest.approx(fd_edm, rel=1e-3)  # the two grids really were sampled differently


def test_record_logs_metrics_grid_and_table_and_updates_the_export(evaluated, study_runs):
    tracker, trial_id, baseline_id, export_path = study_runs
    record_evaluation(evaluated, tracker=tracker)
    client = MlflowClient(tracker.tracking_uri)
    for run_id, evaluation in zip((trial_id, baseline_id), evaluated.schedules):
        run = client.get_run(run_id)
        assert run.data.metrics["eval_fd_exact"] == pytest.approx(evaluation.metrics["eval_fd_exact"])
        assert run.data.tags["eval_seed_offset"] == str(evaluated.config.seed_offset)
        grid = Image.open(client.download_artifacts(run_id, GRID_ARTIFACT))
        assert grid.mode == "RGB" and grid.width >= 3 * 32 and grid.width == grid.height

    exported = load_schedule(export_path)  # still a valid export, with the new metrics beside the old ones
    learned, baseline = evaluated.schedules
    assert exported.metrics["final_val_loss"] == 0.25
    assert exported.metrics["eval_fd_exact"] == pytest.approx(learned.metrics["eval_fd_exact"])
    assert exported.metrics["baseline_edm_rho_eval_fd_exact"] == pytest.approx(baseline.metrics["eval_fd_exact"])

    table = format_evaluation_table(evaluated)
    assert "exact data-space Fréchet distance" in table and "FID" not in table.split("\n")[0]
    row = next(line for line in table.splitlines() if line.startswith("euler-o1"))
    assert f"{learned.metrics['eval_fd_exact']:.4g}" in row and f"{baseline.metrics['eval_fd_exact']:.4g}" in row
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"evaluation.json", "evaluation.txt", "exports"} <= artifacts
    summary = json.loads(Path(client.download_artifacts(tracker.run_id, "evaluation.json")).read_text())
    assert [row["schedule"] for row in summary["schedules"]] == [LEARNED, "edm_rho"]


# --- FID with a randomly initialised Inception network ---------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """FID Inception weights with He-initialised convolutions (random, but features of order one)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / STATE_DICT_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> Path:
    return FeatureStats(torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64)).save(
        tmp_path_factory.mktemp("refs") / "reference.npz")


def test_fid_path_with_random_inception_weights(local_ray, inception_file, reference_file):
    config = EvaluationConfig(num_samples=2, batch_size=1, grid_size=0, fid_reference=str(reference_file),
                              inception_weights=str(inception_file))
    target = ScheduleTarget(SPEC.model_id, "euler", 1, 4, "edm_rho")
    with pytest.warns(UserWarning, match="below the feature dimension 2048"):
        (evaluation,) = evaluate_schedules(SPEC, [target], config, show_progress=False).schedules
    assert math.isfinite(evaluation.metrics["eval_fid"]) and evaluation.metrics["eval_fid"] > 0
    assert "eval_fd_exact" in evaluation.metrics and evaluation.grid is None  # the GMM also gets its exact FD

    gmm = default_gmm(seed=0)  # the same samples through the same network, in this process
    x = sample(gmm, "euler", 1, edm_rho(4, EDMSchedule()), latents_from_seeds(config.sample_seeds(), gmm.shape))
    accumulator = FeatureStatsAccumulator()
    accumulator.add_images(x, load_inception(inception_file))
    with pytest.warns(UserWarning, match="unreliable"):
        expected = accumulator.stats()
    torch.testing.assert_close(evaluation.feature_stats.mu, expected.mu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(evaluation.feature_stats.sigma, expected.sigma, rtol=1e-4, atol=1e-6)
    assert evaluation.feature_stats.image_size == (8, 8)


# --- bad input, caught before any sampling ----------------------------------------------------------------


def _builder_that_must_not_run(*, device, dtype):
    raise AssertionError("the model was built although the input was bad")


register_model_builder("eval-test-unbuildable", _builder_that_must_not_run, replace=True)
UNBUILDABLE = ModelSpec("eval-test-unbuildable", "unbuildable")
TARGET = ScheduleTarget("unbuildable", "euler", 1, 4, "edm_rho")


def test_missing_inception_weights_fail_before_sampling(reference_file, tmp_path):
    config = EvaluationConfig(num_samples=10, fid_reference=str(reference_file),
                              inception_weights=str(tmp_path / "no-inception.pth"))
    with pytest.raises(MissingWeightsError, match="no-inception.pth"):
        evaluate_schedules(UNBUILDABLE, [TARGET], config, show_progress=False)


def test_missing_or_wrong_reference_statistics_fail_before_sampling(inception_file, tmp_path):
    config = EvaluationConfig(num_samples=10, fid_reference=str(tmp_path / "no-stats.npz"),
                              inception_weights=str(inception_file))
    with pytest.raises(FileNotFoundError, match="no-stats.npz"):
        evaluate_schedules(UNBUILDABLE, [TARGET], config, show_progress=False)
    small = FeatureStats(torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)).save(tmp_path / "s.npz")
    with pytest.raises(ValueError, match="feature dimension 64"):
        evaluate_schedules(UNBUILDABLE, [TARGET], replace(config, fid_reference=str(small)), show_progress=False)


def test_fewer_samples_than_feature_dimensions_warn_before_sampling(inception_file, reference_file):
    config = EvaluationConfig(num_samples=2047, fid_reference=str(reference_file), inception_weights=str(inception_file))
    with pytest.warns(UserWarning, match="num_samples=2047 is below the feature dimension 2048"):
        reference = check_evaluation(config)
    assert reference.dim == 2048


def test_seeds_overlapping_the_teachers_are_rejected():
    with pytest.raises(ValueError, match="seed_offset=50.*teacher seed"):
        evaluate_schedules(UNBUILDABLE, [TARGET], EvaluationConfig(num_samples=10, seed_offset=50),
                           reserved_seeds=range(100), show_progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_samples": 1}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"baselines": ("nosuch",)}, "unknown baseline"),
        ({"conditions": (1, "a cat")}, "conditions"),
        ({"num_gpus_per_actor": -1.0}, "num_gpus_per_actor"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvaluationConfig(**overrides)


def _opaque_gmm(*, device, dtype):
    """The GMM behind a plain function: a model whose data moments the evaluation cannot know."""
    model = build_gmm(device=device, dtype=dtype)
    return replace(model, denoiser=lambda x, sigma, cond=None: model.denoiser(x, sigma, cond))


def test_a_model_without_known_moments_needs_fid_reference_statistics(local_ray):
    register_model_builder("eval-test-opaque", _opaque_gmm, replace=True)
    with pytest.raises(ValueError, match="fid_reference is required"):  # raised on the worker, re-raised as itself
        evaluate_schedules(ModelSpec("eval-test-opaque", "opaque"), [TARGET], EvaluationConfig(num_samples=4, batch_size=2),
                           show_progress=False)


def test_a_learned_target_needs_its_grid():
    with pytest.raises(ValueError, match="give the learned sigmas"):
        ScheduleTarget("m", "euler", 1, 4, LEARNED)


# --- the study's command line -----------------------------------------------------------------------------


def test_cli_flags_turn_the_evaluation_stage_on():
    parser = build_parser("test")
    base = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    assert apply_overrides(base, parser.parse_args([])).evaluation is None
    args = parser.parse_args(["--fid-samples", "1000", "--fid-ref", "ref.npz", "--eval-workers", "3",
                              "--gpus-per-trial", "0.5"])
    evaluation = apply_overrides(base, args).evaluation
    assert (evaluation.num_samples, evaluation.fid_reference, evaluation.concurrency) == (1000, "ref.npz", 3)
    assert evaluation.num_gpus_per_actor == 0.5  # a trial's resources


# --- exact moments of what a class-conditional evaluation samples ----------------------------------------


def test_exact_moments_of_cycled_class_conditions_match_monte_carlo():
    model = SPEC.build(dtype=torch.float64)
    config = EvaluationConfig(num_samples=30_000, conditions=(0, 1, 1))  # classes 0 and 1 in proportion 1:2
    moments = exact_moments(model, config)
    classes = torch.tensor([config.sample_condition(i) for i in range(config.num_samples)])
    draws = model.denoiser.sample(config.num_samples, torch.Generator().manual_seed(0), cond=classes).flatten(1)
    torch.testing.assert_close(draws.mean(0), moments.mu, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(draws.T), moments.sigma, rtol=0, atol=0.02)
    single = exact_moments(model, replace(config, conditions=(2,)))
    torch.testing.assert_close(single.sigma, model.denoiser.covariance(2))
    assert exact_moments(model, replace(config, conditions=("a prompt",))) is None
