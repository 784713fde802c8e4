"""Small filesystem helpers shared by the pipeline: writable-directory checks and atomic writes."""

from __future__ import annotations

import os
import tempfile
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
