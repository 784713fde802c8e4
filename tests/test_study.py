"""The study end to end, for real: local Ray, SQLite MLflow, Parquet teacher cache, exported JSON."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient

from ld3.losses import get_loss
from ld3.models.gmm import default_gmm
from ld3.sampling import schedule_loss
from ld3.schedules import EDMSchedule
from pipeline.cli import exit_code
from pipeline.driver import StudyConfig, StudyOptions, run_study
from pipeline.models.registry import LoadedModel, register_model_builder
from pipeline.models.spec import ModelSpec
from pipeline.recording.exports import load_schedule
from pipeline.search.space import SearchSpace
from pipeline.summary import _table_rows, format_table
from pipeline.teacher.cache import TeacherCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import gmm as gmm_study  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's model builder reaches Ray workers


def smoke_config(**overrides) -> StudyConfig:
    return replace(gmm_study.make_config(argparse.Namespace(smoke_test=True)), **overrides)


def options(tmp_path: Path, **overrides) -> StudyOptions:
    base = StudyOptions(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=str(tmp_path / "cache"),
                        exports_dir=str(tmp_path / "exports"), storage_dir=str(tmp_path / "tune"),
                        work_dir=str(tmp_path))
    return replace(base, **overrides)


def test_smoke_study_tracks_exports_and_resumes(local_ray, tmp_path):
    study, opts = smoke_config(), options(tmp_path)
    result = run_study(study, opts)
    assert not result.cache_hit
    (cell,) = result.cells
    assert cell.trials["finished"] >= 1 and cell.best is not None

    client = MlflowClient(opts.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "study"
    assert parent.data.params["num_trials"] == str(study.num_trials)
    children = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    kinds = sorted(run.data.tags["kind"] for run in children)
    assert kinds.count("baseline") == 6 and kinds.count("trial") == study.num_trials  # 4 fixed grids, DMN, GITS
    baselines = {r.data.tags["run_key"]: r for r in children if r.data.tags["kind"] == "baseline"}
    assert {"gits", "dmn"} <= set(baselines) and "ays_sd15" not in baselines  # no AYS list exists for the GMM
    assert all(r.data.metrics["schedule_cost_s"] >= 0 for r in baselines.values())
    trial = next(r for r in children if r.data.tags["kind"] == "trial" and r.info.status == "FINISHED")
    for key in ("model", "solver", "order", "nfe", "teacher_cache_key", "lr1", "slack_coef", "mode"):
        assert key in trial.data.params, key
    cache_entry = TeacherCache(opts.cache_dir).lookup(study.model, study.teacher)
    assert trial.data.params["nfe"] == "4" and trial.data.params["teacher_cache_key"] == cache_entry.key
    assert "final_val_loss" in trial.data.metrics and "fd_exact" in trial.data.metrics
    assert len(client.get_metric_history(trial.info.run_id, "val_loss")) >= 2  # per-step metrics
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {"schedule.json", "schedule.png"} <= artifacts

    # The exported schedule is the cell's best (learned or baseline), in the study's own folder, and reproduces
    # the logged validation loss of its run, which is tagged best=true.
    exported = load_schedule(cell.export_path)
    assert Path(cell.export_path).parent == Path(opts.exports_dir) / study.name
    assert exported.provenance.mlflow_run_id == cell.winner_run_id and exported.source == cell.winner
    assert client.get_run(cell.winner_run_id).data.tags.get("best") == "true"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {"summary.md", "summary.png", "summary.json"}
    logged = client.get_run(exported.provenance.mlflow_run_id).data.metrics["final_val_loss"]
    data = cache_entry.load()
    _, val = data.split(study.num_train, study.num_validation)
    model = default_gmm(seed=0, dtype=torch.float32)
    recomputed = schedule_loss(model, exported.solver, exported.order, exported.sigmas, val.z, val.y,
                               get_loss("l2"), sigmas_eval=exported.sigmas_eval)
    assert math.isclose(recomputed, logged, rel_tol=1e-5)
    assert "exports" in {a.path for a in client.list_artifacts(result.parent_run_id)}

    # A rerun is a cache hit, resumes the same parent run and the finished Tune experiment.
    again = run_study(study, opts)
    assert again.cache_hit and again.parent_run_id == result.parent_run_id
    assert again.cells[0].best["final_val_loss"] == pytest.approx(cell.best["final_val_loss"])
    children_after = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sum(r.data.tags["kind"] == "trial" for r in children_after) == study.num_trials


def _trial_runs(result, tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    return client.search_runs([result.experiment_id], f"tags.kind = 'trial' and tags.mlflow.parentRunId = '{result.parent_run_id}'")


def test_stopped_trials_end_killed_not_failed_and_the_seed_reproduces_the_study(local_ray, tmp_path):
    # Two batches of two concurrent trials: the second batch meets the halving rule at epoch 1 of 2, where a
    # large reduction factor stops what does not beat the first batch's best.
    study = smoke_config(num_trials=4, max_concurrent=2, asha_reduction_factor=50)
    cache = str(tmp_path / "cache")
    first, second = (run_study(study, options(tmp_path / name, cache_dir=cache)) for name in ("a", "b"))
    (cell,) = first.cells
    assert cell.trials["stopped"] >= 1 and cell.trials["finished"] >= 1 and cell.trials["failed"] == 0, cell.trials

    runs = _trial_runs(first, options(tmp_path / "a").tracking_uri)
    statuses = sorted(r.info.status for r in runs)
    assert statuses == sorted(["KILLED"] * cell.trials["stopped"] + ["FINISHED"] * cell.trials["finished"])
    for run in runs:
        assert (run.data.tags.get("stopped_by") == "asha") == (run.info.status == "KILLED"), run.data.tags
        assert "failure" not in run.data.tags

    # Same seed, same trials, same stops, same numbers (concurrent trials finish in either order). The
    # baselines' cost in seconds is a wall-clock time, the one column that is not a function of the seed.
    def seeded_columns(result):
        header, rows = _table_rows(result.cells)
        timed = header.index("cost s")
        return [[v for i, v in enumerate(row) if i != timed] for row in rows]
    assert seeded_columns(first) == seeded_columns(second)
    configs = lambda result, path: sorted(  # noqa: E731
        (r.data.params["lr1"], r.data.params["slack_coef"], r.info.status) for r in _trial_runs(result, path))
    assert configs(first, options(tmp_path / "a").tracking_uri) == configs(second, options(tmp_path / "b").tracking_uri)


def _nan_model(*, device, dtype) -> LoadedModel:
    """The GMM, but its denoiser returns NaN whenever gradients are being recorded (i.e. in training)."""
    gmm = default_gmm(seed=0, dtype=dtype, device=device)

    def denoiser(x, sigma, cond=None):
        out = gmm(x, sigma, cond)
        return out * float("nan") if torch.is_grad_enabled() and x.requires_grad else out

    return LoadedModel(denoiser=denoiser, schedule=EDMSchedule(), shape=gmm.shape)


def test_a_diverging_trial_is_recorded_as_failed_and_the_study_goes_on(local_ray, tmp_path, capsys):
    register_model_builder("nan-gmm-test", _nan_model, replace=True)
    study = smoke_config(name="nan-study", model=ModelSpec("nan-gmm-test", "nan-gmm"), num_trials=2)
    result = run_study(study, options(tmp_path))
    (cell,) = result.cells
    assert cell.trials["failed"] == 2 and cell.best is None
    exported = load_schedule(cell.export_path)  # the best baseline, said to be one
    assert exported.source == f"baseline:{cell.best_baseline[0]}" and exported.learned_beats_baseline is None
    client = MlflowClient(options(tmp_path).tracking_uri)
    runs = client.search_runs([result.experiment_id], "tags.kind = 'trial'")
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("NaN" in r.data.tags.get("failure", "") for r in runs)
    parent = client.get_run(result.parent_run_id)  # no schedule exported: the study is not a success
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure"] == "no trial finished in unipc_bh1-o3 NFE 4 (0/0/2)"
    # Resuming does not restart trials that diverged (they would only diverge again).
    again = run_study(study, options(tmp_path))
    assert again.cells[0].trials["failed"] == 2
    capsys.readouterr()
    assert exit_code(again) == 1  # what the command line returns, after this line
    assert capsys.readouterr().err.startswith("error: no trial finished (ok/stopped/failed) in unipc_bh1-o3 NFE 4 (0/0/2);")
    runs_after = client.search_runs([result.experiment_id], "tags.kind = 'trial'")
    assert {r.info.run_id for r in runs_after} == {r.info.run_id for r in runs}


def test_a_learned_schedule_that_loses_is_not_exported_as_the_winner(local_ray, tmp_path):
    # lr1 ~ 0 keeps ξ at its start, the time-uniform grid, which the smoke GMM's best baseline beats.
    frozen = SearchSpace(rounds_v1=(1, 1), rounds_v2=(1, 1), lr1=(1e-12, 1e-12), decoupled=(False,), modes=("time",),
                         inits=("uniform",))
    base = smoke_config()
    study = smoke_config(name="frozen", search=frozen, trainer=replace(base.trainer, lr1_floor=1e-12), num_trials=1,
                         max_concurrent=1)
    result = run_study(study, options(tmp_path))
    (cell,) = result.cells
    assert cell.best is not None and not cell.learned_wins
    exported = load_schedule(cell.export_path)
    base_name, base = cell.best_baseline
    assert (exported.source, exported.learned_beats_baseline) == (f"baseline:{base_name}", False)
    assert exported.sigmas.tolist() == base["sigmas"] and exported.metrics["final_val_loss"] == base["final_val_loss"]
    assert exported.metrics["learned_final_val_loss"] == cell.best["final_val_loss"]
    assert format_table(result.cells).splitlines()[-1].endswith("baseline")
    client = MlflowClient(options(tmp_path).tracking_uri)
    parent = client.get_run(result.parent_run_id).data.tags
    assert parent[f"{cell.solver.label}_nfe4_exported"] == f"baseline:{base_name}"


def test_unknown_model_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model family"):
        ModelSpec("nosuch", "x").build()
