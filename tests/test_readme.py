"""The README's Python examples run: every ```python block is marked runnable (and executed here, next to a
fixture export where it reads one) or explicitly marked not run, with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ld3.discretizations import BASELINES
from pipeline.models.registry import gmm_spec
from pipeline.recording.exports import build_export, save_export, study_exports_dir

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:^<!-- (runnable|not run)[^\n]*-->\n)?^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str | None, str]]:
    return [(match.group(1), match.group(2)) for match in BLOCK.finditer(README.read_text(encoding="utf-8"))]


def test_every_python_block_is_marked():
    blocks = _blocks()
    assert blocks, "README.md has no python blocks"
    unmarked = [code.splitlines()[0] for mark, code in blocks if mark is None]
    assert not unmarked, f"mark these README blocks <!-- runnable --> or <!-- not run: why -->: {unmarked}"


def _fixture_export(root: Path) -> None:
    """What `python studies/gmm.py` writes for ipndm-o4 at NFE 6 (a baseline grid stands in for the learned one)."""
    model = gmm_spec(seed=0)
    schedule = model.build("cpu").schedule
    sigmas = BASELINES["edm_rho"](6, schedule)
    exported = build_export(sigmas=sigmas, noise_schedule=schedule, model=model.model_id, solver="ipndm", order=4, nfe=6,
                            mode="edm_rho", metrics={"final_val_loss": 0.01}, config={}, teacher_cache_key="fixture",
                            study="gmm", source="baseline:edm_rho", learned_beats_baseline=False)
    save_export(exported, study_exports_dir(root / "exports", "gmm"))


@pytest.mark.parametrize("code", [code for mark, code in _blocks() if mark == "runnable"])
def test_runnable_block_runs(code, tmp_path, monkeypatch, capsys):
    _fixture_export(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert "baseline:edm_rho" in capsys.readouterr().out
