"""pipeline.cli reports only the project's own errors (pipeline.errors) as one line ``error: ...`` with exit code 2;
any other exception, an unexpected ValueError deep in a run included, is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from pipeline import cli, driver
from pipeline.errors import (
    CacheCorruptError,
    StudyError,
    StudyInputError,
    StudyRunningError,
    TeacherGenerationError,
    TrackingError,
    as_input_error,
)
from pipeline.models.spec import gmm_spec
from pipeline.study_config import StudyConfig


def _config(args) -> StudyConfig:
    return StudyConfig("errors-test", gmm_spec())


def _run_raising(monkeypatch, error: BaseException) -> None:
    def run_study(study, options):
        raise error

    monkeypatch.setattr(driver, "run_study", run_study)  # pipeline.cli imports it when a study runs


@pytest.mark.parametrize("error", [StudyInputError, StudyError, TrackingError, CacheCorruptError,
                                   TeacherGenerationError, StudyRunningError])
def test_a_project_error_is_one_line_and_exit_code_2(monkeypatch, capsys, error):
    _run_raising(monkeypatch, error("what went wrong; how to fix it\nsecond line"))
    assert cli.main(_config, "test", []) == 2
    assert capsys.readouterr().err == "error: what went wrong; how to fix it\n"


def test_an_unexpected_value_error_in_a_run_is_a_traceback(monkeypatch, capsys):
    _run_raising(monkeypatch, ValueError("a bug deep in a run"))
    with pytest.raises(ValueError, match="a bug deep in a run"):
        cli.main(_config, "test", [])
    assert "error:" not in capsys.readouterr().err


def test_verbose_reraises_a_project_error_with_its_traceback(monkeypatch):
    _run_raising(monkeypatch, TrackingError("server gone"))
    with pytest.raises(TrackingError, match="server gone"):
        cli.main(_config, "test", ["-v"])


def test_bad_values_while_building_the_config_are_input_errors(monkeypatch, capsys):
    _run_raising(monkeypatch, AssertionError("run_study must not be reached"))
    assert cli.main(_config, "test", ["--nfe", "4,x"]) == 2  # parse_nfes raises a plain ValueError
    assert capsys.readouterr().err.startswith("error: --nfe must be comma-separated integers")

    def bad_script_config(args):
        raise FileNotFoundError("checkpoint /nowhere/model.pkl not found")

    assert cli.main(bad_script_config, "test", []) == 2
    assert capsys.readouterr().err == "error: checkpoint /nowhere/model.pkl not found\n"


def test_as_input_error_converts_only_value_and_os_errors():
    with pytest.raises(StudyInputError, match="^bad$") as caught, as_input_error():
        raise ValueError("bad\ndetails")
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(TrackingError), as_input_error():  # project errors pass through as themselves
        raise TrackingError("unreachable")
    with pytest.raises(KeyError), as_input_error():
        raise KeyError("a bug")
