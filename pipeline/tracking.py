"""MLflow tracking for LD3 studies (docs/design.md: one study = one parent run, one trial = one nested run).

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
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline.fileio import ensure_writable_dir
from pipeline.provenance import code_version, jsonable

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB_FILE = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "mlartifacts"  # next to the SQLite file, so a local study is one folder
PROBE_TIMEOUT_S = 5.0
# MLflow's HTTP client retries a refused request 7 times with waits doubling up to 2 minutes; a study allows
# 3 retries within about 10 s (mlflow.environment_variables), so that an outage is noticed promptly.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

TAG_KIND = "kind"
TAG_STUDY = "study"
TAG_RUN_KEY = "run_key"
TAG_CODE_VERSION = "code_version"
TAG_FAILURE = "failure"  # why a FAILED run failed (always set on FAILED trial runs)
TAG_BEST = "best"  # "true" on the run whose schedule a study exported for its cell
TAG_STOPPED_BY = "stopped_by"  # who stopped a KILLED trial run early ("asha")
TAG_SUPERSEDED_BY = "superseded_by"  # on a trial's run when Tune restarted the trial: the id of its new run
IDENTITY_KEYS = ("model", "solver", "order", "nfe", "teacher_cache_key")
RUN_KINDS = ("trial", "baseline")
# MLflow 3's UI opens an experiment on its GenAI overview unless this experiment tag says it is model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_STATUS_NAMES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message is one line saying what to fix."""


# --------------------------------------------------------------------------------------------------
# URI resolution and the early reachability check


def resolve_tracking_uri(tracking_uri: str | None = None, default_dir: str | os.PathLike = ".") -> str:
    """The tracking URI to use: ``tracking_uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<default_dir>/mlflow.db``."""
    for candidate in (tracking_uri, os.environ.get(TRACKING_URI_ENV)):
        if candidate is not None and candidate.strip():
            uri = candidate.strip()
            if ":" not in uri and uri != "databricks":
                raise ValueError(
                    f"tracking_uri {uri!r} has no scheme; use e.g. sqlite:///path/to/mlflow.db or http://host:5000"
                )
            return uri
    return "sqlite:///" + str(Path(default_dir).expanduser().resolve() / DEFAULT_DB_FILE)


def connect(tracking_uri: str, probe_timeout_s: float = PROBE_TIMEOUT_S) -> MlflowClient:
    """A client for ``tracking_uri`` after proving the backend answers (fails fast, with a one-line error).

    SQLite: the database folder must be writable (ValueError otherwise). HTTP(S): the server must answer
    within ``probe_timeout_s`` (TrackingError otherwise), before MLflow's own slow retry loop could start.
    """
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    if scheme == "sqlite":
        _check_sqlite_folder(tracking_uri)
    elif scheme in ("http", "https"):
        probe_server(tracking_uri, probe_timeout_s)
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # any backend failure becomes one actionable line
        raise TrackingError(
            f"MLflow tracking URI {tracking_uri} is not usable ({_first_line(err)}); "
            f"fix it or pass another --tracking-uri / {TRACKING_URI_ENV}"
        ) from err
    return client


def _sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URI (None: in memory)."""
    path = urllib.parse.urlsplit(tracking_uri).path[1:]
    return Path(path).resolve() if path and path != ":memory:" else None


def _check_sqlite_folder(tracking_uri: str) -> None:
    db_path = _sqlite_db_path(tracking_uri)
    if db_path is not None:
        ensure_writable_dir(db_path.parent, f"tracking URI {tracking_uri}")


def probe_server(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """An HTTP(S) tracking server answers within ``timeout_s`` (TrackingError otherwise); writes nothing."""
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered; the MLflow call in connect() reports auth or routing problems
    except OSError as err:  # URLError, refused connection, DNS failure, timeout
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable ({reason}); start it "
            f"(e.g. `mlflow server --host 0.0.0.0 --port 5000`) or pass a reachable --tracking-uri / {TRACKING_URI_ENV}"
        ) from None


def failure_reason(err: BaseException) -> str:
    """One line for the ``failure`` tag: the exception's type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def mlflow_retry_env() -> dict[str, str]:
    """MLflow's HTTP retry budget for a study's processes: about 10 s of retries (MLflow's default is minutes), so
    an outage of the tracking server stops the study promptly. Values already in the environment win."""
    return {name: os.environ.get(name, default) for name, default in HTTP_RETRY_DEFAULTS.items()}


def tracking_outage(tracking_uri: str) -> TrackingError | None:
    """The error to report when ``tracking_uri`` is a tracking server that does not answer (now); else None."""
    if urllib.parse.urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    try:
        probe_server(tracking_uri, PROBE_TIMEOUT_S)
    except TrackingError:
        return TrackingError(f"tracking server {tracking_uri} stopped answering during the study; restart it and "
                             "rerun the same command to resume")
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------------------------------
# Values: provenance, params, JSON


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat ``{"a.b": "value"}`` (MLflow params are strings; lists are JSON-encoded)."""
    flat: dict[str, str] = {}
    for key, value in jsonable(params).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _check_name(value: str, argument: str) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{argument}={value!r} must be a non-empty name of letters, digits, '.', '_' or '-'")
    return value


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _float_list(values: Any) -> list[float]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double()
    return [float(v) for v in values]


# --------------------------------------------------------------------------------------------------
# The schedule plot


def plot_schedule(
    sigmas: Any,
    sigmas_eval: Any | None = None,
    *,
    baselines: Mapping[str, Any] | None = None,
    costs: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """log σ against step index i: the learned grid σ_i (and the decoupled σ'_i) against baseline grids
    (labelled with the seconds each took to compute, where ``costs`` has them)."""
    figure = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, grid) in enumerate(sorted((baselines or {}).items())):
        values = _float_list(grid)
        cost = "" if name not in (costs or {}) else f" ({costs[name]:.2g} s)"
        axes.plot(range(len(values)), values, color=f"C{index + 2}", lw=1.0, ls=":", marker=".",
                  label=f"baseline: {name}{cost}")
    learned = _float_list(sigmas)
    axes.plot(range(len(learned)), learned, color="C0", lw=2.0, marker="o", label="learned σ (solver steps)")
    if sigmas_eval is not None:
        evaluated = _float_list(sigmas_eval)
        axes.plot(range(len(evaluated)), evaluated, color="C1", lw=1.5, ls="--", marker="x",
                  label="learned σ_eval (denoiser calls)")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step index i")
    axes.set_ylabel("σ_i (log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper right")
    if title:
        axes.set_title(title, fontsize="medium")
    return figure


def plot_learned_vs_baseline(losses: Mapping[str, Mapping[int, tuple[float, float | None]]]) -> Figure:
    """Validation loss against NFE, one panel per solver: the best baseline (dashed) and the learned schedule
    (solid; missing where no trial finished). ``losses[solver][nfe] = (best baseline, learned or None)``."""
    figure = Figure(figsize=(4.0 * max(1, len(losses)), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    for index, (solver, by_nfe) in enumerate(losses.items()):
        axes = figure.add_subplot(1, len(losses), index + 1)
        nfes = sorted(by_nfe)
        axes.plot(nfes, [by_nfe[n][0] for n in nfes], color="C1", ls="--", marker="s", label="best baseline")
        learned = [(n, by_nfe[n][1]) for n in nfes if by_nfe[n][1] is not None]
        axes.plot([n for n, _ in learned], [v for _, v in learned], color="C0", marker="o", label="learned (LD3)")
        axes.set_yscale("log")
        axes.set_xticks(nfes)
        axes.set_xlabel("NFE")
        axes.set_ylabel("validation loss" if index == 0 else "")
        axes.set_title(solver, fontsize="medium")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    return figure


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class TrackingContext:
    """What another process needs to log into a study: strings only, safe to pickle into Ray tasks."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


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
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=chunk)
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":  # e.g. the server did not answer: not a changed value
                raise
            raise ValueError(
                f"params of run {self.run_id} differ from the values it was started with ({_first_line(err)}); "
                "resume only with the same configuration, or start a new run (resume=False / another study name)"
            ) from err

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
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
        for chunk in _chunks(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(jsonable(document), indent=2), artifact_file)

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
            "sigmas": _float_list(sigmas),
            "sigmas_eval": None if sigmas_eval is None else _float_list(sigmas_eval),
            "baselines": {k: _float_list(v) for k, v in (baselines or {}).items()},
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
        _check_name(study, "study")
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
        _check_name(key, "key")
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
    db_path = _sqlite_db_path(tracking_uri) if urllib.parse.urlsplit(tracking_uri).scheme == "sqlite" else None
    return None if db_path is None else (db_path.parent / LOCAL_ARTIFACTS_DIR).as_uri()


def _latest_parent_run(client: MlflowClient, experiment_id: str, study: str) -> Run | None:
    runs = _search_all(client, experiment_id, f"tags.`{TAG_KIND}` = 'study' and tags.`{TAG_STUDY}` = '{study}'",
                       max_results=1)
    return runs[0] if runs else None
