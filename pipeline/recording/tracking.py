"""MLflow tracking for LD3 studies (docs/design.md#mlflow-layout): where runs go and whether the backend answers.

``resolve_tracking_uri`` picks the URI (flag, $MLFLOW_TRACKING_URI, else a SQLite file in the work folder),
``connect`` proves the backend answers before anything is logged, ``tracking_outage`` tells an outage from a
bug after the fact. ``TrackingContext`` (a URI and ids, no live objects) is what other processes get to log
into a study; the runs themselves are in pipeline.recording.runs.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipeline.errors import StudyInputError, TrackingError, first_line
from pipeline.fileio import ensure_writable_dir
from pipeline.recording.provenance import jsonable

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

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --------------------------------------------------------------------------------------------------
# URI resolution and the early reachability check


def resolve_tracking_uri(tracking_uri: str | None = None, default_dir: str | os.PathLike = ".") -> str:
    """The tracking URI to use: ``tracking_uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<default_dir>/mlflow.db``."""
    for candidate in (tracking_uri, os.environ.get(TRACKING_URI_ENV)):
        if candidate is not None and candidate.strip():
            uri = candidate.strip()
            if ":" not in uri and uri != "databricks":
                raise TrackingError(
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
            f"MLflow tracking URI {tracking_uri} is not usable ({first_line(err)}); "
            f"fix it or pass another --tracking-uri / {TRACKING_URI_ENV}"
        ) from err
    return client


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URI (None: in memory)."""
    path = urllib.parse.urlsplit(tracking_uri).path[1:]
    return Path(path).resolve() if path and path != ":memory:" else None


def _check_sqlite_folder(tracking_uri: str) -> None:
    db_path = sqlite_db_path(tracking_uri)
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


def check_name(value: str, argument: str) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.fullmatch(value):
        raise StudyInputError(f"{argument}={value!r} must be a non-empty name of letters, digits, '.', '_' or '-'")
    return value


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i : i + size] for i in range(0, len(items), size))


@dataclass(frozen=True)
class TrackingContext:
    """What another process needs to log into a study: strings only, safe to pickle into Ray tasks."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)
