"""Every code block of docs/exports.md runs, in order, in a folder holding the files it names:
``schedule.json`` (a decoupled export of a DDPM-betas model) and ``ddpm-model/`` (a tiny DDPMPipeline)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ld3.schedules import VPDiscreteSchedule
from pipeline import export_cli
from pipeline.recording.exports import build_export, load_schedule, save_export

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "exports.md"


def code_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced python/bash block of the document, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    from pipeline.models.smoke import _tiny_unet

    folder = tmp_path_factory.mktemp("docs")
    torch.manual_seed(0)
    DDPMPipeline(unet=_tiny_unet(3), scheduler=DDPMScheduler()).save_pretrained(folder / "ddpm-model")
    schedule = VPDiscreteSchedule.linear()
    sigmas = torch.tensor([157.4, 20.0, 3.0, 0.5, 0.08, float(schedule.sigma_min)], dtype=torch.float64)
    sigmas[0] = schedule.sigma_max
    sigmas_eval = sigmas.clone()
    sigmas_eval[1:-1] *= 1.1
    exported = build_export(sigmas=sigmas, sigmas_eval=sigmas_eval, noise_schedule=schedule, model="ddpm", solver="ipndm",
                            order=4, nfe=5, mode="lambda", metrics={"final_val_loss": 0.01}, config={}, teacher_cache_key="k")
    save_export(exported, folder).rename(folder / "schedule.json")
    return folder


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split like the shell does."""
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _run(language: str, code: str, capsys) -> str:
    """stdout of one block, run in this process (its imports are loaded once): Python as is; shell commands
    ``python -m pipeline.export_cli ...`` through that module's ``main`` and ``cat`` (the only ones the page uses)."""
    if language == "python":
        exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})  # noqa: S102 - the project's own document
        return capsys.readouterr().out
    for command in shell_commands(code):
        if command[:3] == ["python", "-m", "pipeline.export_cli"]:
            assert export_cli.main(command[3:]) == 0, capsys.readouterr().err
        else:
            assert command[0] == "cat" and len(command) == 2, f"docs/exports.md uses a command this test cannot run: {command}"
            print(Path(command[1]).read_text(encoding="utf-8"), end="")
    return capsys.readouterr().out


def test_the_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "pipeline.export_cli", "--help"], cwd=REPO, capture_output=True,
                            text=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and all(name in result.stdout for name in ("show", "convert", "compare", "interpolate"))


def test_the_document_has_an_example_per_consumer():
    text = "\n".join(code for _, code in code_blocks())
    for needle in ("LD3Scheduler.from_export", "k_diffusion_sigmas", "--to comfyui"):
        assert needle in text


def test_every_code_block_runs(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    outputs = [_run(language, code, capsys) for language, code in code_blocks()]
    diffusers_out, k_diffusion_out, comfyui_out = outputs[:3]
    assert "(2, 8, 8, 3) network calls: 5" in diffusers_out
    exported = load_schedule(workdir / "schedule.json")
    assert str(exported.sigmas[:-1].tolist() + [0.0]) in k_diffusion_out and "nearest ComfyUI/k-diffusion sampler: ipndm" in k_diffusion_out
    assert [float(v) for v in comfyui_out.strip().splitlines()[-1].split(",")] == exported.k_diffusion_sigmas(ignore_decoupled=True)
    assert (workdir / "schedule.png").is_file() and load_schedule(workdir / "schedule-n8.json").mode == "interpolated"
