"""ld3/ is pure PyTorch: no module under it imports ray, optuna, mlflow or pyarrow (docs/design.md).

Checked twice: statically, by parsing every ``ld3/**/*.py`` (also imports inside functions and
``importlib.import_module("...")`` calls), and dynamically, by importing every ``ld3`` module in a fresh
interpreter and looking for the packages in ``sys.modules`` (catches them arriving through a dependency).
Each checker is first shown to catch a planted violation, so a passing test means something.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "optuna", "mlflow", "pyarrow")


def _top_level(name: str) -> str:
    return name.split(".", 1)[0]


def forbidden_imports(path: Path, forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
    """``"file:line: module"`` for every import of a ``forbidden`` package in the Python file ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found += [f"{path}:{node.lineno}: {name}" for name in names if _top_level(name) in forbidden]
    return found


def modules_loaded_by_importing(package: str, forbidden: tuple[str, ...], path_entry: Path) -> dict:
    """Import ``package`` and all its submodules in a fresh interpreter; report failures and forbidden modules."""
    script = f"""
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
failed = {{}}
for info in pkgutil.walk_packages(package.__path__, {package!r} + "."):
    try:
        importlib.import_module(info.name)
    except Exception as err:
        failed[info.name] = f"{{type(err).__name__}}: {{err}}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {list(forbidden)!r})
print(json.dumps({{"failed": failed, "forbidden": loaded}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path_entry), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], cwd=path_entry, env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_static_checker_catches_planted_imports(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import os, ray.tune\n"
        "from mlflow import MlflowClient\n"
        "from .pyarrow import x\n"  # relative: a sibling module, not the package
        "def f():\n"
        "    import optuna\n"
        "    return __import__('pyarrow.parquet')\n"
    )
    found = [entry.split(": ", 1)[1] for entry in forbidden_imports(planted)]
    assert sorted(found) == ["mlflow", "optuna", "pyarrow.parquet", "ray.tune"]


def test_no_ld3_module_imports_pipeline_packages():
    files = sorted((REPO / "ld3").rglob("*.py"))
    assert len(files) > 10, "expected the ld3 package's modules"
    violations = [hit for path in files for hit in forbidden_imports(path)]
    assert not violations, "ld3/ must stay pure PyTorch; move these imports to pipeline/:\n" + "\n".join(violations)


def test_dynamic_checker_catches_a_transitive_import(tmp_path):
    (tmp_path / "heavy_dependency.py").write_text("")
    (tmp_path / "purepkg").mkdir()
    (tmp_path / "purepkg" / "__init__.py").write_text("")
    (tmp_path / "purepkg" / "inner.py").write_text("import heavy_dependency\n")
    report = modules_loaded_by_importing("purepkg", ("heavy_dependency",), tmp_path)
    assert report == {"failed": {}, "forbidden": ["heavy_dependency"]}


@pytest.mark.timeout(300)
def test_importing_every_ld3_module_loads_none_of_the_pipeline_packages():
    report = modules_loaded_by_importing("ld3", FORBIDDEN, REPO)
    assert not report["failed"], f"ld3 modules that fail to import: {report['failed']}"
    assert not report["forbidden"], f"importing ld3 loaded {report['forbidden']}; ld3/ must stay pure PyTorch"
