"""pipeline.recording.exports: round trip, validation, MLflow logging and real diffusers schedulers."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from mlflow import MlflowClient

from ld3.schedules import EDMSchedule, VPDiscreteSchedule
from pipeline.recording.exports import (
    ExportedSchedule,
    build_export,
    export_file_name,
    load_schedule,
    save_best_export,
    save_export,
    study_exports_dir,
)
from pipeline.recording.runs import StudyTracker

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _logsnr_grid(schedule, n_steps: int) -> torch.Tensor:
    ends = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    return torch.exp(-torch.linspace(float(ends[0]), float(ends[1]), n_steps + 1, dtype=torch.float64))


def _decoupled(sigmas: torch.Tensor) -> torch.Tensor:
    """Interior points moved by a quarter of the smallest log-gap, endpoints kept (the method's masking)."""
    log_s = sigmas.log()
    shift = 0.25 * (log_s[:-1] - log_s[1:]).min()
    shifts = torch.full_like(log_s, float(shift))
    shifts[[0, -1]] = 0.0
    return torch.exp(log_s + shifts)


def _edm_export(**overrides) -> ExportedSchedule:
    schedule = EDMSchedule()
    sigmas = _logsnr_grid(schedule, 6)
    kwargs = dict(sigmas=sigmas, sigmas_eval=_decoupled(sigmas), noise_schedule=schedule, model="cifar10/edm vp",
                  solver="ipndm", order=4, nfe=6, mode="lambda", metrics={"val_loss": 0.125, "fd": 1.5},
                  config={"lr1": 0.005, "seeds": (1, 2)}, teacher_cache_key="cafe1234", mlflow_run_id="abc", study="s")
    return build_export(**{**kwargs, **overrides})


def _sd_export(n_steps: int = 6) -> ExportedSchedule:
    schedule = VPDiscreteSchedule.scaled_linear()
    return build_export(sigmas=_logsnr_grid(schedule, n_steps), noise_schedule=schedule, model="sd15", solver="unipc_bh2",
                        order=3, nfe=n_steps, mode="time", metrics={"val_loss": 0.3}, config={}, teacher_cache_key="k")


def test_round_trip_is_exact(tmp_path):
    exported = _edm_export()
    path = save_export(exported, tmp_path / "exports")
    assert path.name == "cifar10-edm-vp__ipndm-o4__nfe6.json" == export_file_name("cifar10/edm vp", "ipndm", 4, 6)
    loaded = load_schedule(path)
    assert loaded.sigmas.dtype == torch.float64 and torch.equal(loaded.sigmas, exported.sigmas)
    assert torch.equal(loaded.sigmas_eval, exported.sigmas_eval)
    assert torch.equal(loaded.timesteps, exported.sigmas)  # EDM native time is sigma
    assert (loaded.n_steps, loaded.nfe, loaded.order, loaded.decoupled) == (6, 6, 4, True)
    assert loaded.metrics == {"val_loss": 0.125, "fd": 1.5}
    assert loaded.provenance == exported.provenance
    assert loaded.provenance.config == {"lr1": 0.005, "seeds": [1, 2]}
    assert loaded.provenance.code_version  # git describe or package version
    document = json.loads(path.read_text())
    assert document["schema_version"] == 1 and document["n_steps"] == 6 and document["noise_schedule"] == "edm"


def test_saving_again_replaces_the_same_file_atomically(tmp_path):
    save_export(_edm_export(), tmp_path)
    path = save_export(_edm_export(metrics={"val_loss": 0.05}), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    assert load_schedule(path).metrics == {"val_loss": 0.05}


def test_vp_discrete_timesteps_are_native_training_steps():
    exported = _sd_export()
    assert float(exported.timesteps[0]) == pytest.approx(999.0) and float(exported.timesteps[-1]) == pytest.approx(0.0)
    schedule = VPDiscreteSchedule.scaled_linear()
    assert torch.allclose(schedule.sigma(exported.timesteps), exported.sigmas, rtol=1e-9)


def _mutated(document: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(document)
    target = changed
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("schema_version",), 2, "schema_version is 2"),
        (("sigmas",), [80.0, 10.0, 20.0, 1.0, 0.5, 0.1, 0.002], "sigmas must be strictly descending"),
        (("sigmas",), [80.0, 1.0, 0.5, 0.1, 0.05, 0.01, -0.002], "sigmas must be positive"),
        (("sigmas_eval",), [80.0, 1.0, 0.002], "sigmas_eval has 3 points but sigmas has 7"),
        (("timesteps",), [80.0, 1.0], "timesteps has 2 points"),
        (("n_steps",), 5, "n_steps is 5 but sigmas has 7 points"),
        (("decoupled",), False, "decoupled is False but sigmas_eval is set"),
        (("nfe",), 0, "nfe must be an integer >= 1"),
        (("metrics", "val_loss"), float("nan"), "metrics['val_loss'] must be a finite number"),
        (("mode",), _DELETE, "mode is missing"),
        (("extra_field",), 1, "extra_field is not a field of schema version 1"),
        (("provenance", "teacher_cache_key"), "", "provenance.teacher_cache_key must be a non-empty string"),
        (("provenance", "created"), "yesterday", "provenance.created='yesterday' must be an ISO-8601 timestamp"),
    ],
)
def test_invalid_files_name_the_file_and_field(tmp_path, path, value, message):
    document = _mutated(_edm_export().to_dict(), path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(ValueError) as info:
        load_schedule(bad)
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value)


def test_sigmas_eval_endpoints_must_match():
    sigmas = _logsnr_grid(EDMSchedule(), 4)
    moved_start = sigmas.clone()
    moved_start[0] = 70.0
    with pytest.raises(ValueError, match="sigmas_eval must share its first and last values"):
        _edm_export(sigmas=sigmas, sigmas_eval=moved_start, nfe=4)


def test_build_rejects_grid_outside_the_schedule():
    with pytest.raises(ValueError, match="sigmas has values outside"):
        _edm_export(sigmas=torch.tensor([100.0, 1.0, 0.002], dtype=torch.float64), sigmas_eval=None)


def test_not_json_and_missing_file(tmp_path):
    garbage = tmp_path / "x.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule(garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_schedule(tmp_path / "missing.json")


def test_unwritable_exports_dir_writes_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="exports_dir: directory .* is not writable"):
        save_export(_edm_export(), blocker / "exports")


def test_export_is_logged_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = StudyTracker.open("exports", default_dir=tmp_path / "mlflow")
    path = save_export(_edm_export(mlflow_run_id=study.run_id), tmp_path / "exports", tracker=study)
    client = MlflowClient(tracking_uri=study.tracking_uri)
    assert [f.path for f in client.list_artifacts(study.run_id, "exports")] == [f"exports/{path.name}"]
    downloaded = client.download_artifacts(study.run_id, f"exports/{path.name}", str(tmp_path))
    assert load_schedule(downloaded).provenance.mlflow_run_id == study.run_id


def test_diffusers_euler_sigmas_reproduce_the_grid_exactly():
    diffusers = pytest.importorskip("diffusers")
    exported = _sd_export()
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(sigmas=exported.diffusers_sigmas())
    assert torch.allclose(scheduler.sigmas.double(), exported.sigmas, rtol=1e-5)
    assert torch.allclose(scheduler.timesteps.double(), exported.timesteps[:-1], atol=1e-3)
    scheduler.set_timesteps(sigmas=exported.diffusers_sigmas(final="zero"))
    assert float(scheduler.sigmas[-1]) == 0.0 and torch.allclose(scheduler.sigmas[:-1].double(), exported.sigmas[:-1], rtol=1e-5)


def test_diffusers_dpmsolver_integer_timesteps():
    diffusers = pytest.importorskip("diffusers")
    exported = _sd_export()
    timesteps = exported.diffusers_timesteps()
    assert all(isinstance(t, int) for t in timesteps) and len(timesteps) == exported.n_steps
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=timesteps)
    assert scheduler.timesteps.tolist() == timesteps
    schedule = VPDiscreteSchedule.scaled_linear()
    at_integers = schedule.sigma(torch.tensor(timesteps, dtype=torch.float64))
    assert torch.allclose(scheduler.sigmas[:-1].double(), at_integers, rtol=1e-5)
    assert float(scheduler.sigmas[-1]) == pytest.approx(float(exported.sigmas[-1]), rel=1e-4)  # σ_N; diffusers works in float32
    # rounding moves σ by less than one training step's worth of the grid
    assert torch.allclose(at_integers, exported.sigmas[:-1], rtol=0.03)


def test_diffusers_lists_refuse_what_diffusers_cannot_express():
    edm = _edm_export()
    with pytest.raises(ValueError, match="decoupled"):
        edm.diffusers_sigmas()
    assert len(edm.diffusers_sigmas(ignore_decoupled=True)) == 7
    with pytest.raises(ValueError, match="no diffusers training-step timesteps"):
        edm.diffusers_timesteps(ignore_decoupled=True)
    dense = _sd_export(n_steps=400)  # near t = 0 the log-SNR grid is denser than integer steps
    with pytest.raises(ValueError, match="round to the same integer timestep"):
        dense.diffusers_timesteps()
    assert len(dense.diffusers_timesteps(integer=False)) == 400


def test_studies_export_into_their_own_folders():
    assert study_exports_dir("exports", "gmm") != study_exports_dir("exports", "gmm-smoke")
    assert study_exports_dir("/x/exports", "gmm").as_posix() == "/x/exports/gmm"


def test_a_better_export_is_kept_and_a_worse_one_replaced_with_a_note(tmp_path):
    first = save_best_export(_edm_export(metrics={"val_loss": 0.1}), tmp_path, metric="val_loss")
    assert first.written and first.note == ""
    worse = save_best_export(_edm_export(metrics={"val_loss": 0.3}, mlflow_run_id="worse"), tmp_path, metric="val_loss")
    assert not worse.written and worse.path == first.path and "kept" in worse.note and "0.1" in worse.note
    assert load_schedule(first.path).metrics["val_loss"] == 0.1
    same = save_best_export(_edm_export(metrics={"val_loss": 0.1}), tmp_path, metric="val_loss")
    assert not same.written and same.note == ""  # a rerun measuring the same: kept, nothing to report
    better = save_best_export(_edm_export(metrics={"val_loss": 0.05}), tmp_path, metric="val_loss")
    assert better.written and "0.1 -> 0.05" in better.note
    assert load_schedule(first.path).metrics["val_loss"] == 0.05


def test_an_export_from_other_teacher_data_or_an_invalid_file_is_replaced(tmp_path):
    path = save_best_export(_edm_export(metrics={"val_loss": 0.01}), tmp_path, metric="val_loss").path
    other = save_best_export(_edm_export(metrics={"val_loss": 0.5}, teacher_cache_key="other"), tmp_path, metric="val_loss")
    assert other.written and "other teacher data" in other.note
    path.write_text("{broken")
    again = save_best_export(_edm_export(metrics={"val_loss": 0.9}), tmp_path, metric="val_loss")
    assert again.written and "not a valid export" in again.note and load_schedule(path).metrics["val_loss"] == 0.9


def test_exports_say_whether_the_learned_schedule_won_and_are_group_readable(tmp_path):
    exported = _edm_export(source="baseline:edm_rho", learned_beats_baseline=False, sigmas_eval=None, mode="edm_rho")
    path = save_export(exported, tmp_path)
    document = json.loads(path.read_text())
    assert document["source"] == "baseline:edm_rho" and document["learned_beats_baseline"] is False
    loaded = load_schedule(path)
    assert (loaded.source, loaded.learned_beats_baseline) == ("baseline:edm_rho", False)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not tempfile's 0o600
    for key in ("source", "learned_beats_baseline"):  # files written before these fields existed still load
        del document[key]
    path.write_text(json.dumps(document))
    assert (load_schedule(path).source, load_schedule(path).learned_beats_baseline) == ("learned", None)
    with pytest.raises(ValueError, match="source"):
        _edm_export(source="teacher")
