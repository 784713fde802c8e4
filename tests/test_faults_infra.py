"""Infrastructure faults caused for real: a study's driver killed with SIGKILL during its trials, two identical
studies started at once, the MLflow tracking server killed while a trial runs.

Each test runs ``studies/gmm.py --smoke-test`` in real subprocesses (their own Ray, their own process group)
and checks what survives in MLflow, in Tune's experiment state and in the exports folder.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDY = "gmm-smoke"
CELL = "unipc_bh1-o3-nfe4"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "LD3_CACHE_DIR", "LD3_STORAGE_DIR"):
        env.pop(name, None)
    return env


def _study_command(work: Path, tracking_uri: str, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "studies/gmm.py"), "--smoke-test", "--num-cpus", "2",
            "--tracking-uri", tracking_uri, "--cache-dir", str(work / "cache"), "--exports-dir", str(work / "exports"),
            "--storage-dir", str(work / "tune"), *flags]


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in its own process group (so it and every process it starts can be killed at once)."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (a machine crash for the study and its Ray)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the study exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _trial_runs_in_db(db: Path, status: str) -> int:
    """Trial runs with ``status`` in the SQLite store (read directly: cheap enough to poll)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                               "where t.key = 'kind' and t.value = 'trial' and r.status = ?", (status,)).fetchone()[0]
    except sqlite3.Error:  # not migrated yet, or locked for a moment
        return 0


def _tune_trials(work: Path) -> dict[str, dict]:
    """Tune's own record of the cell's trials: trial id -> config."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(work / "tune" / STUDY / CELL))
    return {trial.trial_id: trial.config for trial in analysis.trials}


def _trial_runs(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    return client.search_runs([experiment.experiment_id], "tags.kind = 'trial'", max_results=1000)


def _check_trial_runs_match_tune(tracking_uri: str, work: Path) -> None:
    """One current MLflow run per Tune trial, with that trial's params; a superseded run is KILLED and names
    the run that replaced it; no run logs a metric step twice."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    trials = _tune_trials(work)
    runs = _trial_runs(tracking_uri)
    current = [r for r in runs if "superseded_by" not in r.data.tags]
    assert sorted(r.data.tags["run_key"] for r in current) == sorted(trials), (len(runs), len(trials))
    ids = {r.info.run_id for r in runs}
    for run in runs:
        if run in current:
            assert run.info.status in ("FINISHED", "KILLED", "FAILED"), run.info.status
            config = trials[run.data.tags["run_key"]]
            assert float(run.data.params["lr1"]) == pytest.approx(config["lr1"])
            assert float(run.data.params["slack_coef"]) == pytest.approx(config["slack_coef"])
        else:
            assert run.info.status == "KILLED" and run.data.tags["superseded_by"] in ids
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert len(steps) == len(set(steps)), f"run {run.info.run_id} logged a val_loss step twice"


@pytest.mark.slow
def test_study_killed_with_sigkill_during_trials_resumes_without_orphan_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    db = work / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = _env(tmp_path)
    command = _study_command(work, uri)
    first = _start(command, work / "first.log", env)
    try:
        _wait_for(lambda: _trial_runs_in_db(db, "RUNNING") > 0, 240, "a running trial", first)
        time.sleep(1.0)  # some steps logged
    finally:
        _kill_group(first)
    assert first.returncode == -signal.SIGKILL
    second = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    lock = work / "tune" / f"{STUDY}.lock"  # left by the killed driver, taken over with a message
    assert f"taking over the lock {lock} of a study that is no longer running (pid {first.pid} on" in second.stderr
    assert list((work / "exports").rglob("*.json")) and not lock.exists()
    _check_trial_runs_match_tune(uri, work)


def test_study_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
    import json

    from pipeline.errors import StudyRunningError
    from pipeline.study_lock import study_lock

    storage = tmp_path / "tune" / "deeper"
    with study_lock(str(storage), STUDY):
        with pytest.raises(StudyRunningError, match=f"^study '{STUDY}' is already running .pid {os.getpid()} on "):
            with study_lock(str(storage), STUDY):
                pass
    assert not (tmp_path / "tune").exists()  # the folders the lock created are removed with it
    storage.mkdir(parents=True)
    lock = storage / f"{STUDY}.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": "gone"}))  # left by a study killed with SIGKILL
    with caplog.at_level("WARNING", logger="pipeline.study_lock"), study_lock(str(storage), STUDY):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock {lock} of a study that is no longer running (pid 999999 on gone)" in caplog.text
    assert not lock.exists() and storage.exists()


@pytest.mark.slow
def test_a_second_identical_study_is_refused_while_the_first_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"  # fresh: two drivers would race on its schema migration
    env = _env(tmp_path)
    command = _study_command(work, uri)
    lock = work / "tune" / f"{STUDY}.lock"
    first = _start(command, work / "first.log", env)
    try:
        _wait_for(lambda: lock.exists() and lock.read_text(), 120, "the first study's lock", first)
        started = time.monotonic()
        second = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        print(f"the second study was refused after {time.monotonic() - started:.1f} s")
        first.wait(timeout=400)
    finally:
        _kill_group(first)
    assert second.returncode == 2, second.stderr[-3000:]
    *before, last = second.stderr.strip().splitlines()
    assert last == (f"error: study '{STUDY}' is already running (pid {first.pid} on {socket.gethostname()}, lock "
                    f"{lock}); wait for it to finish, or stop it and rerun this command to resume"), last
    assert not any(line.startswith(("error", "Traceback")) for line in before), before
    assert first.returncode == 0, (work / "first.log").read_text()[-3000:]
    assert not lock.exists()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY)
    assert len(client.search_runs([experiment.experiment_id], "tags.kind = 'study'")) == 1
    assert len(_trial_runs(uri)) == 2  # the smoke study's trials, each run once
    _check_trial_runs_match_tune(uri, work)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=1):
            return True
    except OSError:
        return False


def _start_tracking_server(work: Path, port: int, env: dict[str, str], log_name: str) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1 with a SQLite store (no job runner: it only slows the start)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
               "--artifacts-destination", str(work / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = _start(command, work / log_name, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    _wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), 240, "the tracking server", server)
    return server


@pytest.mark.slow
def test_tracking_server_killed_during_a_trial_stops_the_study_and_a_rerun_completes_it(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = _env(tmp_path)
    command = _study_command(work, uri)
    server = _start_tracking_server(work, port, env, "server.log")
    study = _start(command, work / "first.log", env)
    try:
        _wait_for(lambda: _trial_runs_in_db(work / "server.db", "RUNNING") > 0, 300, "a running trial", study)
        _kill_group(server)
        killed = time.monotonic()
        study.wait(timeout=300)
        stopped_after_s = time.monotonic() - killed
    finally:
        _kill_group(server)
        _kill_group(study)
    print(f"study stopped {stopped_after_s:.0f} s after the tracking server was killed")
    output = (work / "first.log").read_text()
    assert study.returncode == 2, output[-3000:]
    *before, last = output.strip().splitlines()
    assert last == (f"error: tracking server {uri} stopped answering during the study; restart it and rerun the "
                    "same command to resume"), output[-3000:]
    assert not any(line.startswith("error") for line in before)
    assert "pipeline/cli.py" not in output  # no traceback of the driver (Tune does print the trials' errors)
    assert stopped_after_s < 120

    server = _start_tracking_server(work, port, env, "server2.log")
    try:
        rerun = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        row = next(line for line in rerun.stdout.splitlines() if line.startswith("unipc_bh1-o3"))
        assert row.split()[-2].endswith("/0"), row  # trials ok/stopped/failed (then "exported"): none failed
        assert len(list((work / "exports").rglob("*.json"))) == 1
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(STUDY)
        (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'study'")
        assert parent.info.status == "FINISHED"
        _check_trial_runs_match_tune(uri, work)
    finally:
        _kill_group(server)
