"""Small filesystem helpers shared by the pipeline: writable-directory checks, atomic writes, exclusive locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ld3.utils import atomic_write_bytes


def ensure_writable_dir(path: str | os.PathLike, argument: str) -> Path:
    """Create ``path`` if needed and prove it is writable by writing a probe file.

    Raises ValueError naming ``argument`` (e.g. ``"--exports-dir"``) when the directory cannot be
    created or written, so a study fails before any work rather than after it.
    """
    directory = Path(path).expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{argument}: directory {directory} is not writable ({reason}); pass a writable directory") from None
    return directory


def check_writable_dir(path: str | os.PathLike, argument: str) -> Path:
    """Check, creating nothing, that ``path`` is a writable directory or can be made one: its nearest
    existing ancestor must be a directory this process may write into. ValueError naming ``argument``."""
    directory = Path(path).expanduser().resolve()
    existing = directory
    while not existing.exists():
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem is not None:
        raise ValueError(f"{argument}: directory {directory} cannot be created or written ({problem}); "
                         "pass a writable directory")
    return directory


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (ld3.utils.atomic_write_bytes)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, timeout: float | None = None, poll_s: float = 0.05) -> Iterator[int]:
    """Hold an OS lock (``flock``) on the file ``path`` and delete the file on release, so no lock file outlives
    its holder; yields the locked file's descriptor (to record the holder in it, say).

    Deleting a lock file is safe only if every taker checks, once it holds the lock, that the file it locked is
    still the one at ``path`` (a waiter may have opened the old file just before it was deleted); a taker
    that finds another inode there tries again on the new file. Raises TimeoutError after ``timeout`` seconds
    (None: wait forever).
    """
    path = os.fspath(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_until(fd, path, deadline, poll_s)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was replaced after we opened it: lock the new one
    try:
        yield fd
    finally:
        os.unlink(path)  # while still holding the lock: waiters then see another inode (or none) and retry
        os.close(fd)


def _flock_until(fd: int, path: str, deadline: float | None, poll_s: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"another process holds the lock {path}; wait for it to finish, or remove the "
                                   "file if no such process is running") from None
            time.sleep(poll_s)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
