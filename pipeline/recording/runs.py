"""MLflow runs of a study (docs/design.md: one study = one parent run, one trial = one nested run).

Driver side: ``StudyTracker.open(study, ...)`` resolves and checks the tracking URI, gets the study's
experiment and finds (resume) or creates its parent run. Trial side: ``TrialLogger.start(context, ...)``
opens a nested run from a picklable ``TrackingContext`` (a URI and ids, no live objects), so it works
inside Ray Tune trial processes. Every call goes through an explicit ``MlflowClient``; MLflow's global
"active run" state is never used.

Runs are tagged ``kind`` (study | trial | baseline), ``study``, ``run_key`` and the identity
``model, solver, order, nfe, teacher_cache_key`` (also logged as params), so the MLflow UI's compare
view lines trials and baselines up by model / solver / NFE.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from torch import Tensor

from pipeline.errors import TrackingError, first_line
from pipeline.recording.plots import float_list, plot_schedule
from pipeline.recording.provenance import code_version, jsonable
from pipeline.recording.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    IDENTITY_KEYS,
    LOCAL_ARTIFACTS_DIR,
    PROBE_TIMEOUT_S,
    RUN_KINDS,
    TAG_CODE_VERSION,
    TAG_KIND,
    TAG_RUN_KEY,
    TAG_STUDY,
    TAG_SUPERSEDED_BY,
    TrackingContext,
    check_name,
    chunks,
    connect,
    flatten_params,
    resolve_tracking_uri,
    sqlite_db_path,
)

Client = MlflowClient  # what pipeline.evaluation passes around without importing MLflow
_STATUS_NAMES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


class _RunLogger:
    """One MLflow run: params, tags, buffered per-step metrics (sent with log_batch), artifacts, status."""

    def __init__(self, client: MlflowClient, run_id: str, *, resumed: bool, title: str,
                 flush_every: int = 200, flush_interval_s: float = 10.0):
        self.client, self.run_id, self.resumed, self.title = client, run_id, resumed, title
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()
        self.last_step = 0

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log a (nested) config as params; logging an identical value again is allowed, a changed one is not."""
        entries = [Param(k, v) for k, v in flatten_params(params).items()]
        try:
            for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=chunk)
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":  # e.g. the server did not answer: not a changed value
                raise
            raise ValueError(
                f"params of run {self.run_id} differ from the values it was started with ({first_line(err)}); "
                "resume only with the same configuration, or start a new run (resume=False / another study name)"
            ) from err

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Buffer one step's metrics; they are sent with log_batch every ``flush_every`` values or
        ``flush_interval_s`` seconds, and on flush()/end()."""
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), timestamp, int(step)) for k, v in metrics.items())
        self.last_step = max(self.last_step, int(step))
        due = time.monotonic() - self._last_flush >= self.flush_interval_s
        if len(self._pending) >= self.flush_every or due:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for chunk in chunks(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(jsonable(document), indent=2), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(local_path), artifact_path)

    def log_schedule(
        self,
        sigmas: Any,
        sigmas_eval: Any | None = None,
        *,
        baselines: Mapping[str, Any] | None = None,
        costs: Mapping[str, float] | None = None,
        name: str = "schedule",
    ) -> None:
        """Log ``<name>.json`` (σ, σ_eval, the baseline grids) and ``<name>.png`` (plot_schedule of them)."""
        document = {
            "sigmas": float_list(sigmas),
            "sigmas_eval": None if sigmas_eval is None else float_list(sigmas_eval),
            "baselines": {k: float_list(v) for k, v in (baselines or {}).items()},
        }
        self.log_dict(document, f"{name}.json")
        self.log_figure(plot_schedule(sigmas, sigmas_eval, baselines=baselines, costs=costs, title=self.title),
                        f"{name}.png")

    def end(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics and mark the run FINISHED, FAILED or KILLED."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r} must be 'FINISHED', 'FAILED' or 'KILLED'")
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


class StudyTracker(_RunLogger):
    """The study's parent run (driver side). Create with ``StudyTracker.open``; hand ``.context`` to trials."""

    def __init__(self, client: MlflowClient, context: TrackingContext, *, resumed: bool):
        super().__init__(client, context.parent_run_id, resumed=resumed, title=f"study {context.study}")
        self.context = context

    @classmethod
    def open(
        cls,
        study: str,
        *,
        tracking_uri: str | None = None,
        default_dir: str | os.PathLike = ".",
        resume: bool = True,
        params: Mapping[str, Any] | Any | None = None,
        tags: Mapping[str, Any] | None = None,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> StudyTracker:
        """Check the backend, get experiment ``study``, and resume its latest parent run (``resume=True``)
        or start a new one. Unfinished nested runs of a resumed study are marked KILLED."""
        check_name(study, "study")
        uri = resolve_tracking_uri(tracking_uri, default_dir)
        client = connect(uri, probe_timeout_s)
        experiment_id = _experiment_id(client, study, uri)
        parent = _latest_parent_run(client, experiment_id, study) if resume else None
        run_tags = {TAG_KIND: "study", TAG_STUDY: study, TAG_CODE_VERSION: code_version(), **(tags or {})}
        if parent is None:
            run_id = client.create_run(experiment_id, run_name=study, tags={k: str(v) for k, v in run_tags.items()}).info.run_id
        else:
            run_id = parent.info.run_id
            client.update_run(run_id, status="RUNNING")
        tracker = cls(client, TrackingContext(uri, experiment_id, run_id, study), resumed=parent is not None)
        if parent is not None:
            tracker.set_tags(run_tags)
            for child in tracker.child_runs(status="RUNNING"):
                client.set_terminated(child.info.run_id, status="KILLED")
        if params is not None:
            tracker.log_params(params)
        return tracker

    @property
    def experiment_id(self) -> str:
        return self.context.experiment_id

    @property
    def tracking_uri(self) -> str:
        return self.context.tracking_uri

    def close_run(self, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
        """Tag a nested run of the study and set its final status (FINISHED, FAILED or KILLED)."""
        self.tag_run(run_id, tags or {})
        self.client.set_terminated(run_id, status=status)

    def tag_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on a nested run of the study (e.g. ``best`` on the run whose schedule was exported)."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def child_runs(self, kind: str | None = None, status: str | None = None) -> list[Run]:
        """Nested runs of this study, optionally only one ``kind`` (trial | baseline) or ``status``."""
        clauses = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}'"]
        if kind is not None:
            clauses.append(f"tags.`{TAG_KIND}` = '{_check_kind(kind)}'")
        if status is not None:
            if status not in _STATUS_NAMES:
                raise ValueError(f"status={status!r} must be one of {_STATUS_NAMES}")
            clauses.append(f"attributes.status = '{status}'")
        return _search_all(self.client, self.experiment_id, " and ".join(clauses))


class TrialLogger(_RunLogger):
    """A nested run for one trial or baseline; build it in any process from a ``TrackingContext``."""

    @classmethod
    def start(
        cls,
        context: TrackingContext,
        *,
        kind: str,
        key: str,
        model: str,
        solver: str,
        order: int,
        nfe: int,
        teacher_cache_key: str,
        params: Mapping[str, Any] | Any | None = None,
        tags: Mapping[str, Any] | None = None,
        flush_every: int = 200,
        flush_interval_s: float = 10.0,
    ) -> TrialLogger:
        """Open the nested run identified by (kind, key, model, solver, order, nfe). ``key`` is the trial id or
        the baseline name. A baseline reuses its run from an earlier attempt of a resumed study; a trial that
        Tune restarted from scratch gets a new run, and its earlier run is marked KILLED with tag
        ``superseded_by`` (so no metric step is logged twice and every current run is one Tune trial).

        Identity and ``params`` (all hyperparameters, nested configs flattened) are logged as params;
        identity, ``kind``, ``study`` and ``run_key`` as tags.
        """
        _check_kind(kind)
        check_name(key, "key")
        identity = {"model": model, "solver": solver, "order": int(order), "nfe": int(nfe),
                    "teacher_cache_key": teacher_cache_key}
        hyperparameters = flatten_params(params or {})
        identity_params = flatten_params(identity)
        clashes = sorted(k for k in identity_params if k in hyperparameters and hyperparameters[k] != identity_params[k])
        if clashes:
            raise ValueError(f"params {clashes} contradict the run identity {identity}; drop them from params")
        run_tags = {MLFLOW_PARENT_RUN_ID: context.parent_run_id, TAG_STUDY: context.study, TAG_KIND: kind,
                    TAG_RUN_KEY: key, **identity_params, **{k: str(v) for k, v in (tags or {}).items()}}
        client = context.client()
        found = _search_all(client, context.experiment_id, _identity_filter(context, run_tags), max_results=1)
        existing = found if kind == "baseline" else []  # a restarted trial starts again at step 0: a new run
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            name = f"{solver}-o{order} nfe{nfe} {key} {kind}"  # short; the end says trial or baseline
            run_id = client.create_run(context.experiment_id, run_name=name, tags=run_tags).info.run_id
            if found:
                _supersede(client, found[0].info.run_id, run_id)
        title = f"{model} · {solver} order {order} · NFE {nfe} · {kind} {key}"
        logger = cls(client, run_id, resumed=bool(existing), title=title,
                     flush_every=flush_every, flush_interval_s=flush_interval_s)
        if existing:
            logger.set_tags(run_tags)
        logger.log_params({**identity_params, **hyperparameters})
        return logger

    def log_final_metrics(self, metrics: Mapping[str, float]) -> None:
        """Flush the per-step history, then log end-of-run metrics at the last step (sent at once)."""
        self.log_metrics(metrics, self.last_step)
        self.flush()


def _supersede(client: MlflowClient, old_run_id: str, new_run_id: str) -> None:
    """An earlier run of a trial that Tune restarted from scratch: KILLED, tagged with the run replacing it."""
    client.set_tag(old_run_id, TAG_SUPERSEDED_BY, new_run_id)
    client.set_terminated(old_run_id, status="KILLED")


def _check_kind(kind: str) -> str:
    if kind not in RUN_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {RUN_KINDS}")
    return kind


def _identity_filter(context: TrackingContext, run_tags: Mapping[str, str]) -> str:
    keys = (MLFLOW_PARENT_RUN_ID, TAG_KIND, TAG_RUN_KEY, *IDENTITY_KEYS)
    return " and ".join(f"tags.`{k}` = '{_quote(run_tags[k])}'" for k in keys)


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"tag value {value!r} must not contain a single quote")
    return value


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str, max_results: int | None = None) -> list[Run]:
    """All runs matching ``filter_string`` (newest first), following MLflow's page tokens."""
    runs: list[Run] = []
    token = None
    page_size = min(max_results or 1000, 1000)
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=page_size,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs[:max_results]


def _experiment_id(client: MlflowClient, study: str, tracking_uri: str) -> str:
    """The id of experiment ``study`` (created if missing), tagged to open on the runs table in the MLflow UI."""
    experiment = client.get_experiment_by_name(study)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {study!r} is deleted; restore it (`mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}`) or use another study name"
        )
    if experiment is None:
        try:
            client.create_experiment(study, artifact_location=_local_artifact_location(tracking_uri))
        except MlflowException:  # created meanwhile by another driver
            pass
        experiment = client.get_experiment_by_name(study)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _local_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts go next to the database file; remote servers choose themselves."""
    db_path = sqlite_db_path(tracking_uri) if urllib.parse.urlsplit(tracking_uri).scheme == "sqlite" else None
    return None if db_path is None else (db_path.parent / LOCAL_ARTIFACTS_DIR).as_uri()


def _latest_parent_run(client: MlflowClient, experiment_id: str, study: str) -> Run | None:
    runs = _search_all(client, experiment_id, f"tags.`{TAG_KIND}` = 'study' and tags.`{TAG_STUDY}` = '{study}'",
                       max_results=1)
    return runs[0] if runs else None


# --------------------------------------------------------------------------------------------------
# Runs of an evaluation after the fact (pipeline.evaluation)


def sibling_baseline_runs(client: Client, trial_run_id: str | None) -> dict[str, str]:
    """Baseline name -> run id of the baseline runs in the same study and cell as ``trial_run_id``."""
    if trial_run_id is None:
        return {}
    trial = client.get_run(trial_run_id)
    parent = trial.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent is None:
        return {}
    clauses = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'", f"tags.`{TAG_KIND}` = 'baseline'"]
    clauses += [f"tags.`{key}` = '{trial.data.tags[key]}'" for key in IDENTITY_KEYS if key in trial.data.tags]
    return {run.data.tags[TAG_RUN_KEY]: run.info.run_id for run in _search_all(client, trial.info.experiment_id,
                                                                                " and ".join(clauses))}


def log_to_run(client: Client, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str],
               image: Any | None = None, image_file: str | None = None) -> None:
    """Add metrics (at step 0), tags and optionally an image artifact to an existing run."""
    client.log_batch(run_id, metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if image is not None:
        client.log_image(run_id, image, image_file)


def logged_grid(client: Client, run_id: str) -> Tensor | None:
    """The σ grid a study's baseline run logged (its ``schedule.json``), or None where it logged none."""
    if "schedule.json" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        document = json.loads(Path(client.download_artifacts(run_id, "schedule.json", folder)).read_text())
    return torch.tensor(document["sigmas"], dtype=torch.float64)
