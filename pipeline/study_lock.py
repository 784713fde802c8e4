"""One driver per study: an exclusive lock file in the study's Tune storage folder, held while the study runs.

Two identical commands started at once would otherwise share the MLflow parent run and the Tune experiment
(every trial runs twice, the result tables disagree), and on a fresh SQLite database race on its schema
migration. ``study_lock(storage_dir, study)`` takes ``<storage_dir>/<study>.lock`` with ``fcntl.flock``
(``pipeline.fileio.exclusive_lock``) before the study touches MLflow or Tune, writes the holder's PID and
host into it, and removes it (and the folders it had to create) at the end. The operating system releases the lock of a process that dies, so a
lock left by a killed study is taken over, with a message naming the dead holder. A storage URI (``s3://``)
has no file locks; such studies are not guarded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import StudyRunningError
from pipeline.fileio import exclusive_lock

log = logging.getLogger(__name__)


@contextmanager
def study_lock(storage_dir: str, study: str) -> Iterator[None]:
    """Hold ``<storage_dir>/<study>.lock`` for the ``with`` block; StudyRunningError if another process holds it."""
    if "://" in storage_dir:
        yield
        return
    created = _make_dirs(Path(storage_dir))
    path = Path(storage_dir) / f"{study}.lock"
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(exclusive_lock(path, timeout=0))
        except TimeoutError:
            _remove_empty(created)
            raise StudyRunningError(
                f"study {study!r} is already running ({_holder(path.read_text(errors='replace'))}, lock {path}); "
                "wait for it to finish, or stop it and rerun this command to resume"
            ) from None
        _record_holder(fd, path)
        try:
            yield
        finally:
            held.close()  # releases and deletes the lock file
            _remove_empty(created)


def _record_holder(fd: int, path: Path) -> None:
    """Write this process into the lock file; a holder already there died without cleaning up (say so)."""
    previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous != "holder unknown":
        log.warning("taking over the lock %s of a study that is no longer running (%s)", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)


def _holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those it created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: the study wrote into it
            return
