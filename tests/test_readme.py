"""The README's code runs: every ```python block is marked runnable (and executed here, next to a fixture export
where it reads one) or explicitly marked not run, with the reason; every ```bash block is run as written
(servers: until they answer), run with --dry-run (study commands that take minutes) or marked not run, with
the reason."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ld3.discretizations import BASELINES
from pipeline.models.spec import gmm_spec
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


# --- the shell blocks -------------------------------------------------------------------------------------------
REPO = README.parent
SHELL_BLOCK = re.compile(r"(?:^<!-- (runnable|dry run|not run)([^\n]*)-->\n)?^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
CI_SCRIPT = REPO / ".ci" / "run"


def _shell_blocks() -> list[tuple[str | None, str, str]]:
    """(mark, what the mark says after it, the block's text) of every ```bash block."""
    return [m.groups() for m in SHELL_BLOCK.finditer(README.read_text(encoding="utf-8"))]


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, `&&` chains split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" #", 1)[0].strip() for line in joined.splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&")]


def test_every_shell_block_is_marked():
    blocks = _shell_blocks()
    assert len(blocks) >= 5, "README.md lost its shell blocks"
    unmarked = [text.splitlines()[0] for mark, _, text in blocks if mark is None]
    assert not unmarked, f"mark these README blocks <!-- runnable -->, <!-- dry run --> or <!-- not run: why -->: {unmarked}"
    assert all(why.strip(": ") for mark, why, _ in blocks if mark == "not run"), "a 'not run' mark must say why"


def test_ci_runs_the_readme_test_command_and_install():
    ci = CI_SCRIPT.read_text(encoding="utf-8")
    (test_block,) = [text for mark, why, text in _shell_blocks() if "test command" in why]
    (test_command,) = _commands(test_block)
    assert any(line.startswith(test_command) for line in ci.splitlines()), f".ci/run must run {test_command!r}"
    assert 'pip install -q -c constraints.txt -e ".[test]"' in ci


def _dry_run_cases() -> list[str]:
    return [command for mark, _, text in _shell_blocks() if mark == "dry run" for command in _commands(text)]


@pytest.mark.parametrize("command", _dry_run_cases())
def test_dry_run_block_commands(command, tmp_path):
    """Study commands run as written plus --dry-run (every input checked, nothing written); the set-up commands
    are the ones .ci/run runs on every CI machine."""
    if command.startswith(("python3 -m venv", ". .venv/bin/activate", "pip install")):
        assert command.split()[-1].strip('"') in CI_SCRIPT.read_text(encoding="utf-8"), command
        return
    program, script, *flags = shlex.split(command)
    assert program == "python" and script.startswith("studies/"), f"dry-run blocks hold study commands: {command!r}"
    done = subprocess.run([sys.executable, str(REPO / script), *flags, "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "nothing written (--dry-run)" in done.stdout
    assert not any(tmp_path.iterdir()), f"--dry-run wrote {sorted(p.name for p in tmp_path.iterdir())}"


def _served_url(why: str) -> str:
    return re.search(r"serves (\S+)", why).group(1)


@pytest.mark.parametrize("command,url", [(c, _served_url(why)) for mark, why, text in _shell_blocks()
                                         if mark == "runnable" for c in _commands(text)])
def test_runnable_server_block_serves(command, url, tmp_path):
    """A server command runs as written (in a fresh folder) and answers at the address the README gives."""
    with socket.socket() as probe:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.skip(f"port {port} is taken on this machine")
    server = subprocess.Popen(command, shell=True, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                assert server.poll() is None, f"{command!r} exited with {server.returncode}"
                assert time.monotonic() < deadline, f"{command!r} did not serve {url} within 120 s"
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
