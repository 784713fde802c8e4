"""``--help`` of every study script loads no heavy library, and the plain-data names of ld3.catalog are the
torch-side registries' names (one home for each list).

A study script builds its config at import, so its configs (ld3.config, pipeline.study_config and the modules
they use) must be plain data; the driver (Ray, MLflow, torch) is imported only when a study runs. Each script
runs in a fresh interpreter that reports which packages it loaded (bench/cli_startup.py times them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ld3.catalog import (
    DISCRETIZATION_NAMES,
    LOSS_NAMES,
    PIXEL_LOSS_NAMES,
    SOLVER_TABLE,
    coefficient_shape,
    matching_registry,
)

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow", "optuna", "pyarrow")
SCRIPTS = sorted(p.stem for p in (REPO / "studies").glob("*.py") if not p.stem.startswith("_"))
# Runs a study command, then prints, as the last line of stderr, its exit code and the heavy packages it loaded.
REPORTER = f"""
import json, runpy, sys
command = sys.argv[1:]
try:
    if command[0] == "ld3-study":
        from pipeline.cli import study_command
        code = study_command(command[1:])
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")
        code = 0
except SystemExit as done:
    code = done.code
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def run_reporting(*command: str) -> tuple[dict, str]:
    """(the reporter's line, stdout) of ``command`` (a script path and flags, or ``ld3-study ...``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", REPORTER, *command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


def test_the_reporter_sees_heavy_packages_a_script_loads(tmp_path):
    script = tmp_path / "loads_torch.py"
    script.write_text("import torch.nn\n")
    report, _ = run_reporting(str(script))
    assert report == {"code": 0, "heavy": ["torch"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_study_script_loads_no_heavy_package(script):
    report, out = run_reporting(str(REPO / "studies" / f"{script}.py"), "--help")
    assert report == {"code": 0, "heavy": []}, report
    assert out.startswith("usage:") and "--smoke-test" in out
    assert "(default: " in out and "default: None" not in out  # the recipe's real values


def test_ld3_study_help_loads_no_heavy_package():
    report, out = run_reporting("ld3-study", "gmm", "--help")
    assert report == {"code": 0, "heavy": []}, report
    assert out.startswith("usage: ld3-study gmm") and "(default: unipc_bh1:3,ipndm:4,dpmpp:2)" in out


def test_a_bad_flag_value_is_refused_before_any_heavy_package_loads():
    report, _ = run_reporting(str(REPO / "studies" / "gmm.py"), "--nfe", "0")
    assert report == {"code": 2, "heavy": []}, report


# ---------------------------------------------------------------------------------------------
# One home per registry: the torch side implements exactly the catalog's names
# ---------------------------------------------------------------------------------------------
def test_torch_registries_implement_exactly_the_catalog_names():
    from ld3.discretizations import BASELINES
    from ld3.losses import PIXEL_LOSSES, get_loss
    from ld3.solvers import SOLVER_SPECS

    assert tuple(PIXEL_LOSSES) == PIXEL_LOSS_NAMES and set(LOSS_NAMES) - set(PIXEL_LOSS_NAMES) == {"lpips"}
    assert callable(get_loss("l1")) and tuple(BASELINES) == DISCRETIZATION_NAMES
    assert tuple(SOLVER_SPECS) == tuple(SOLVER_TABLE)
    for name, spec in SOLVER_SPECS.items():
        info = SOLVER_TABLE[name]
        assert (spec.orders, spec.calls_per_step) == (info.orders, info.calls_per_step)
        assert (spec.coefficient_slots is None) == (info.coefficient_slots is None)
        for order in info.orders if info.coefficient_slots else ():
            assert coefficient_shape(name, 5, order) == (5, spec.coefficient_slots(order))


def test_a_registry_that_differs_from_the_catalog_is_refused():
    assert list(matching_registry("solvers", ("b", "a"), {"a": 1, "b": 2})) == ["b", "a"]  # the catalog's order
    with pytest.raises(ValueError, match=r"missing \['b'\], not in the catalog \[\]"):
        matching_registry("solvers", ("a", "b"), {"a": 1})
    with pytest.raises(ValueError, match=r"missing \[\], not in the catalog \['c'\]\); add the name to ld3/catalog.py"):
        matching_registry("solvers", ("a",), {"a": 1, "c": 3})
