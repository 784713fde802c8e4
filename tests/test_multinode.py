"""A two-node Ray cluster on this machine (each node declares one GPU; the work falls back to the CPU):
teacher generation, a small study and its evaluation stage spread over both nodes, tracked to a real
MLflow server (HTTP, SQLite database, proxied artifact store) started by the test, checked through the
MLflow client."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from pipeline.driver import StudyOptions, run_study
from pipeline.evaluation.targets import GRID_ARTIFACT, EvaluationConfig
from pipeline.models.registry import build_gmm, register_model_builder
from pipeline.models.spec import ModelSpec
from pipeline.recording.exports import load_schedule
from pipeline.teacher.cache import TeacherCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import gmm as gmm_study  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the marking builder reaches the workers
SERVER_START_TIMEOUT_S = 180


def _gmm_marking_its_node(*, device, dtype, marker_dir: str, **kwargs):
    """The embedded GMM; leaves a file named after the Ray node (and process) that built it."""
    (Path(marker_dir) / f"{ray.get_runtime_context().get_node_id()}-{os.getpid()}").touch()
    return build_gmm(device=device, dtype=dtype, **kwargs)


register_model_builder("multinode-gmm", _gmm_marking_its_node, replace=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with a SQLite backend and proxied artifacts; started first, awaited by ``tracking_uri``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield process, f"http://127.0.0.1:{port}", root / "server.log"
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker form their own process group
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def cluster_nodes(mlflow_server):
    """Head and worker node, 1 CPU and 1 (declared) GPU each; the test's driver connects to the head."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    yield {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def tracking_uri(mlflow_server, cluster_nodes):
    process, uri, log = mlflow_server
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


def test_teacher_study_and_evaluation_spread_over_two_nodes(cluster_nodes, tracking_uri, tmp_path, monkeypatch):
    assert len(cluster_nodes) == 2
    # Ray Data starts pool actors while it already dispatches batches, so a tiny job may finish on the first
    # actor alone; make it wait for all of them (pipeline.evaluation.sampling does this for its own pool).
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    markers = tmp_path / "built-on"
    markers.mkdir()
    smoke = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    spec = ModelSpec("multinode-gmm", "gmm-seed0", {"seed": 0, "marker_dir": str(markers)})
    evaluation = EvaluationConfig(num_samples=40, batch_size=10, concurrency=2, num_gpus_per_actor=1, grid_size=2,
                                  baselines=("edm_rho",))
    study = replace(smoke, name="multinode", model=spec, teacher=replace(smoke.teacher, concurrency=2, batch_size=5),
                    gpus_per_trial=1, cpus_per_trial=1, num_trials=2, max_concurrent=2, evaluation=evaluation)
    options = StudyOptions(tracking_uri=tracking_uri, cache_dir=str(tmp_path / "cache"),
                           exports_dir=str(tmp_path / "exports"), storage_dir=str(tmp_path / "tune"), work_dir=str(tmp_path))

    # Teacher generation: two actors of one CPU each cannot share a one-CPU node.
    entry = TeacherCache(options.cache_dir).get_or_generate(study.model, study.teacher)
    assert not entry.hit and entry.manifest["num_rows"] == study.teacher.num_samples
    assert {marker.name.split("-")[0] for marker in markers.iterdir()} == cluster_nodes

    # The study (teacher data now a cache hit), then its evaluation stage: GPU work on a machine without CUDA.
    result = run_study(study, options)
    assert result.cache_hit
    (cell,) = result.cells
    assert cell.best is not None and cell.export_path is not None

    client = MlflowClient(tracking_uri)
    trials = client.search_runs([result.experiment_id],
                                f"tags.kind = 'trial' and tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(trials) == study.num_trials
    assert {run.data.tags["ray_node_id"] for run in trials} == cluster_nodes  # both trials ran at once, one per node
    assert {run.data.tags["device"] for run in trials} == {"cpu"}  # a declared GPU without CUDA falls back

    assert result.evaluation.nodes == cluster_nodes  # two one-GPU actors on two one-GPU nodes
    learned, baseline = result.evaluation.schedules
    assert (learned.target.name, baseline.target.name) == ("learned", "edm_rho")
    for evaluation in (learned, baseline):
        run = client.get_run(evaluation.target.mlflow_run_id)
        assert run.data.metrics["eval_fd_exact"] == pytest.approx(evaluation.metrics["eval_fd_exact"])
        assert run.data.metrics["eval_num_samples"] == 40
        assert set(run.data.tags["eval_ray_nodes"].split(",")) <= cluster_nodes
        grid = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
        assert grid == [GRID_ARTIFACT]
    assert learned.target.mlflow_run_id == cell.winner_run_id  # the exported schedule (learned, or a baseline that won)

    exported = load_schedule(cell.export_path)
    assert exported.metrics["eval_fd_exact"] == pytest.approx(learned.metrics["eval_fd_exact"])
    assert exported.metrics["baseline_edm_rho_eval_fd_exact"] == pytest.approx(baseline.metrics["eval_fd_exact"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"{cell.solver.label}_nfe{cell.nfe}_learned_eval_fd_exact"] == pytest.approx(
        learned.metrics["eval_fd_exact"])
    summary = json.loads(Path(client.download_artifacts(result.parent_run_id, "evaluation.json", str(tmp_path))).read_text())
    assert summary["config"]["num_samples"] == 40 and len(summary["schedules"]) == 2
