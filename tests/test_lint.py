"""The whole repository passes ``ruff check`` with the configuration in pyproject.toml ([tool.ruff]).

Fix findings with ``python -m ruff check --fix .`` (imports, annotations) and by hand;
``python -m ruff check . --statistics`` counts what is left.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "--output-format", "concise", "--no-cache"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"ruff check . failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
