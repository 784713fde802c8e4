"""pipeline.recording.tracking against a real SQLite-backed MLflow store (no mocks)."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import socket

import pytest
import torch
from mlflow import MlflowClient

from pipeline.errors import TrackingError
from pipeline.recording.plots import plot_learned_vs_baseline, plot_schedule
from pipeline.recording.runs import StudyTracker, TrialLogger
from pipeline.recording.tracking import TrackingContext, flatten_params, resolve_tracking_uri

IDENTITY = dict(model="gmm", solver="ipndm", order=4, nfe=6, teacher_cache_key="cafe1234")


@pytest.fixture(scope="module")
def tracking_dir(tmp_path_factory):
    """One SQLite store for the module: creating MLflow's tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def client(tracking_dir):
    return MlflowClient(tracking_uri=resolve_tracking_uri(None, tracking_dir))


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _grid(n: int = 6, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.logspace(torch.log10(torch.tensor(80.0)), torch.log10(torch.tensor(0.002)), n + 1, dtype=torch.float64)


def _download_json(client: MlflowClient, run_id: str, path: str, tmp_path) -> dict:
    return json.loads(open(client.download_artifacts(run_id, path, str(tmp_path))).read())


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    with pytest.raises(ValueError, match="no scheme"):
        resolve_tracking_uri("just/a/path", tmp_path)


def test_flatten_params_nests_and_encodes():
    flat = flatten_params({"lr": 0.005, "phase": {"rounds": 2, "decoupled": True}, "seeds": (1, 2), "mode": "lambda"})
    assert flat == {"lr": "0.005", "phase.rounds": "2", "phase.decoupled": "true", "seeds": "[1, 2]", "mode": "lambda"}


def test_study_parent_and_nested_runs(tracking_dir, client, tmp_path):
    study = StudyTracker.open("nested", default_dir=tracking_dir, params={"num_samples": 8, "search": {"r": [0.01, 1]}})
    assert not study.resumed
    with TrialLogger.start(study.context, kind="trial", key="t0001", params={"lr1": 0.005, "phase": {"rounds_v1": 2}},
                           **IDENTITY) as trial:
        for step in range(5):
            trial.log_metrics({"train_loss": 1.0 / (step + 1), "val_loss": 2.0 / (step + 1)}, step=step)
        trial.log_schedule(_grid(), _grid(scale=1.01), baselines={"edm_rho": _grid(scale=0.9)})
        trial.log_final_metrics({"final_val_loss": 0.25})
    with TrialLogger.start(study.context, kind="baseline", key="edm_rho", **IDENTITY) as baseline:
        baseline.log_schedule(_grid(scale=0.9))
        baseline.log_final_metrics({"final_val_loss": 0.5})
    study.end()

    parent = client.get_run(study.run_id)
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "nested"
    assert parent.data.tags["kind"] == "study" and parent.data.tags["study"] == "nested"
    assert parent.data.params == {"num_samples": "8", "search.r": "[0.01, 1]"}

    children = {run.data.tags["kind"]: run for run in study.child_runs()}
    assert set(children) == {"trial", "baseline"}
    trial_run = client.get_run(trial.run_id)
    assert trial_run.info.run_name == "ipndm-o4 nfe6 t0001 trial"
    experiment = client.get_experiment(study.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    assert trial_run.info.status == "FINISHED"
    assert trial_run.data.tags["mlflow.parentRunId"] == study.run_id
    assert {k: trial_run.data.tags[k] for k in ("model", "solver", "order", "nfe", "teacher_cache_key")} == {
        "model": "gmm", "solver": "ipndm", "order": "4", "nfe": "6", "teacher_cache_key": "cafe1234"}
    assert trial_run.data.params == {"model": "gmm", "solver": "ipndm", "order": "4", "nfe": "6",
                                     "teacher_cache_key": "cafe1234", "lr1": "0.005", "phase.rounds_v1": "2"}
    history = client.get_metric_history(trial.run_id, "val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 2.0 / (s + 1)) for s in range(5)]
    final = client.get_metric_history(trial.run_id, "final_val_loss")
    assert [(m.step, m.value) for m in final] == [(4, 0.25)]

    assert {f.path for f in client.list_artifacts(trial.run_id)} == {"schedule.json", "schedule.png"}
    document = _download_json(client, trial.run_id, "schedule.json", tmp_path)
    assert document["sigmas"] == pytest.approx(_grid().tolist())
    assert document["sigmas_eval"] == pytest.approx(_grid(scale=1.01).tolist())
    assert document["baselines"]["edm_rho"] == pytest.approx(_grid(scale=0.9).tolist())
    png = open(client.download_artifacts(trial.run_id, "schedule.png", str(tmp_path)), "rb").read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert _download_json(client, baseline.run_id, "schedule.json", tmp_path)["sigmas_eval"] is None


def test_metrics_are_buffered_and_sent_in_batches(tracking_dir, client):
    study = StudyTracker.open("batching", default_dir=tracking_dir)
    trial = TrialLogger.start(study.context, kind="trial", key="t0", flush_every=10_000, flush_interval_s=3600,
                              **IDENTITY)
    for step in range(1500):
        trial.log_metrics({"loss": float(step)}, step=step)
    assert client.get_metric_history(trial.run_id, "loss") == []  # nothing sent per scalar
    trial.flush()  # 1500 values > MLflow's 1000 per log_batch: sent in two chunks
    assert sorted(m.step for m in client.get_metric_history(trial.run_id, "loss")) == list(range(1500))


def test_exception_marks_run_failed(tracking_dir, client):
    study = StudyTracker.open("failing", default_dir=tracking_dir)
    with pytest.raises(FloatingPointError):
        with TrialLogger.start(study.context, kind="trial", key="nan", **IDENTITY) as trial:
            trial.log_metrics({"loss": float("nan")}, step=0)
            raise FloatingPointError("loss is NaN")
    assert client.get_run(trial.run_id).info.status == "FAILED"
    assert len(client.get_metric_history(trial.run_id, "loss")) == 1  # buffered value flushed on failure


def test_resume_finds_the_interrupted_parent_and_trials(tracking_dir, client):
    first = StudyTracker.open("resumable", default_dir=tracking_dir, params={"num_samples": 4})
    trial = TrialLogger.start(first.context, kind="trial", key="t7", **IDENTITY)
    baseline = TrialLogger.start(first.context, kind="baseline", key="edm_rho", **IDENTITY)
    trial.log_metrics({"loss": 1.0}, step=0)
    trial.flush()  # the driver dies here: parent, trial and baseline stay RUNNING

    resumed = StudyTracker.open("resumable", default_dir=tracking_dir, params={"num_samples": 4})
    assert resumed.resumed and resumed.run_id == first.run_id
    assert client.get_run(trial.run_id).info.status == "KILLED"
    again = TrialLogger.start(resumed.context, kind="trial", key="t7", **IDENTITY)
    assert not again.resumed and again.run_id != trial.run_id  # Tune restarts the trial at step 0: a new run
    superseded = client.get_run(trial.run_id)
    assert superseded.info.status == "KILLED" and superseded.data.tags["superseded_by"] == again.run_id
    baseline_again = TrialLogger.start(resumed.context, kind="baseline", key="edm_rho", **IDENTITY)
    assert baseline_again.resumed and baseline_again.run_id == baseline.run_id
    assert client.get_run(baseline.run_id).info.status == "RUNNING"
    same_key_other_nfe = TrialLogger.start(resumed.context, kind="trial", key="t7", **{**IDENTITY, "nfe": 8})
    assert not same_key_other_nfe.resumed
    assert len(resumed.child_runs(kind="trial")) == 3

    with pytest.raises(ValueError, match="resume only with the same configuration"):
        StudyTracker.open("resumable", default_dir=tracking_dir, params={"num_samples": 5})
    fresh = StudyTracker.open("resumable", default_dir=tracking_dir, resume=False)
    assert not fresh.resumed and fresh.run_id != first.run_id
    assert fresh.child_runs() == []


def _log_from_child_process(payload: bytes) -> str:
    context = pickle.loads(payload)
    with TrialLogger.start(context, kind="trial", key="remote", **IDENTITY) as trial:
        trial.log_metrics({"loss": 0.5}, step=3)
    return trial.run_id


def test_trial_logger_from_another_process(tracking_dir, client):
    study = StudyTracker.open("remote", default_dir=tracking_dir)
    assert isinstance(study.context, TrackingContext)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        run_id = pool.apply(_log_from_child_process, (pickle.dumps(study.context),))
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == study.run_id
    assert run.data.metrics == {"loss": 0.5} and run.info.status == "FINISHED"


def test_identity_clash_and_bad_names_are_rejected(tracking_dir):
    study = StudyTracker.open("names", default_dir=tracking_dir)
    with pytest.raises(ValueError, match="contradict the run identity"):
        TrialLogger.start(study.context, kind="trial", key="t", params={"nfe": 8}, **IDENTITY)
    with pytest.raises(ValueError, match="kind="):
        TrialLogger.start(study.context, kind="experiment", key="t", **IDENTITY)
    with pytest.raises(ValueError, match="study="):
        StudyTracker.open("bad name'", default_dir=tracking_dir)


def test_deleted_experiment_is_a_clear_error(tracking_dir, client):
    study = StudyTracker.open("deleted", default_dir=tracking_dir)
    client.delete_experiment(study.experiment_id)
    with pytest.raises(TrackingError, match="is deleted; restore it"):
        StudyTracker.open("deleted", default_dir=tracking_dir)


def test_unreachable_server_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError) as info:
        StudyTracker.open("offline", tracking_uri=uri, probe_timeout_s=2.0)
    message = str(info.value)
    assert "\n" not in message and uri in message and "unreachable" in message and "--tracking-uri" in message


def test_unwritable_sqlite_folder_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="a_file/sub is not writable"):
        StudyTracker.open("x", default_dir=blocker / "sub")
    assert blocker.read_text() == "not a folder"


def test_plot_schedule_labels_every_curve():
    figure = plot_schedule(_grid(), _grid(scale=1.02), baselines={"time_uniform": _grid(scale=0.5)}, title="t")
    axes = figure.axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["baseline: time_uniform", "learned σ (solver steps)", "learned σ_eval (denoiser calls)"]
    assert axes.get_yscale() == "log" and axes.get_xlabel() == "step index i"


def test_summary_plot_has_a_panel_per_solver_and_skips_missing_learned_points():
    figure = plot_learned_vs_baseline({"ipndm-o4": {4: (0.02, 0.01), 6: (0.01, None)}, "dpmpp-o2": {4: (0.03, 0.02)}})
    assert [axes.get_title() for axes in figure.axes] == ["ipndm-o4", "dpmpp-o2"]
    baseline, learned = figure.axes[0].get_lines()
    assert list(baseline.get_xdata()) == [4, 6] and list(learned.get_xdata()) == [4]  # no trial finished at NFE 6
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["best baseline", "learned (LD3)"]
