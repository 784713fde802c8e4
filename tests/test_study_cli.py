"""Study command line: bad input gives a one-line error, a non-zero exit code, and writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

from pipeline.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import gmm as gmm_study  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--solvers", "nosuch:2"], "unknown solver"),
        (["--solvers", "unipc_bh1:9"], "order"),
        (["--nfe", "0"], "--nfe"),
        (["--nfe", "4,x"], "--nfe"),
        (["--tracking-uri", "http://127.0.0.1:{port}"], "127.0.0.1"),
        (["--address", "127.0.0.1:{port}"], "cannot reach the Ray cluster"),
        (["--cache-dir", "{blocker}/cache"], "--cache-dir"),
        (["--exports-dir", "{blocker}/exports"], "--exports-dir"),
    ],
)
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, dry_run, tmp_path, capsys, closed_port):
    blocker = tmp_path / "a-file"  # a folder below a regular file cannot be created, even by root
    blocker.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    argv = [a.format(port=closed_port, blocker=blocker) for a in argv]
    defaults = ["--smoke-test", "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--cache-dir", str(work / "cache"),
                "--exports-dir", str(work / "exports"), "--storage-dir", str(work / "tune")]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(gmm_study.make_config, "test", defaults + argv + dry_run))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert not ray.is_initialized()
    assert not any(work.iterdir())  # no folder (cache, exports, tune) and no mlflow.db: nothing is written


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--dry-run", "--nfe", "4,6", "--solvers", "ipndm:3", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
            "--cache-dir", str(work / "cache"), "--exports-dir", str(work / "exports"), "--storage-dir", str(work / "t")]
    assert main(gmm_study.make_config, "test", argv) == 0
    out = capsys.readouterr().out
    assert "cells:      2 = solvers ipndm-o3 x NFE 4, 6; 8 trials each" in out, out
    assert f"exports:    {work / 'exports' / 'gmm'}" in out
    assert not any(work.iterdir()) and not ray.is_initialized()


def test_a_solver_without_order_gets_its_highest_order():
    from ld3.solvers import SOLVER_SPECS
    from pipeline.cli import parse_solvers

    choices = parse_solvers("ipndm,unipc_bh1:2")
    assert [(c.name, c.order) for c in choices] == [("ipndm", max(SOLVER_SPECS["ipndm"].orders)), ("unipc_bh1", 2)]
    with pytest.raises(ValueError, match="unknown solver 'nosuch'"):
        parse_solvers("nosuch")


def test_ld3_study_command_runs_a_study_script_by_name(capsys):
    from pipeline.cli import study_command, study_names

    assert {"gmm", "cifar10", "sd15"} <= set(study_names())
    with pytest.raises(SystemExit) as exit_info:  # argparse's --help exits
        sys.exit(study_command(["gmm", "--help"]))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ld3-study gmm")
    # The recipe's real defaults, each said once.
    assert "(default: 8)" in out and "(default: 4,6,8)" in out and "(default: unipc_bh1:3,ipndm:4,dpmpp:2)" in out
    assert "default: None" not in out and out.count("(default:") == out.count("default:")
    assert study_command(["nosuch"]) == 2 and "unknown study 'nosuch'" in capsys.readouterr().err
