"""Provenance helpers with no tracking dependency: the code version and JSON-ready config values.

Shared by ``pipeline.recording.tracking`` (MLflow params) and ``pipeline.recording.exports`` (exported schedules), so reading
or writing an export needs torch alone (no mlflow, no ray).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe --always --dirty`` of this checkout, else the installed package version, else "unknown"."""
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            result = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True, text=True, timeout=10, check=True,
            )
            return result.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return "ld3-studies " + importlib.metadata.version("ld3-studies")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a config value: dataclasses and mappings -> dict, sequences -> list,
    paths -> str, tensors / numpy values -> numbers or lists."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    raise ValueError(f"cannot record a value of type {type(value).__name__} ({value!r}); convert it to str, number, list or dict")
