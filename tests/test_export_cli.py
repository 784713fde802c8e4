"""Consumer formats of exports and ``python -m pipeline.export_cli`` (show, convert, compare, interpolate)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ld3.schedules import EDMSchedule, VPDiscreteSchedule
from pipeline.export_cli import main
from pipeline.recording.export_tools import loglinear_interpolation
from pipeline.recording.exports import build_export, load_schedule, save_export

DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _logsnr_grid(schedule, n_steps: int) -> torch.Tensor:
    ends = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    return torch.exp(-torch.linspace(float(ends[0]), float(ends[1]), n_steps + 1, dtype=torch.float64))


def _save(folder: Path, schedule=None, *, decoupled: bool = False, solver: str = "ipndm", order: int = 4,
          n_steps: int = 6, metrics: dict | None = None) -> Path:
    schedule = schedule or VPDiscreteSchedule.linear()
    sigmas = _logsnr_grid(schedule, n_steps)
    sigmas_eval = None
    if decoupled:
        sigmas_eval = sigmas.clone()
        sigmas_eval[1:-1] *= 1.07
    exported = build_export(sigmas=sigmas, sigmas_eval=sigmas_eval, noise_schedule=schedule, model="m", solver=solver,
                            order=order, nfe=n_steps, mode="lambda", metrics=metrics or {}, config={"lr": 0.1},
                            teacher_cache_key="key")
    return save_export(exported, folder)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- formats in the file and their round trip --------------------------------------------------
def test_consumers_block_carries_every_format_and_round_trips(tmp_path):
    path = _save(tmp_path)
    block = json.loads(path.read_text())["consumers"]
    exported = load_schedule(path)
    sigmas = exported.sigmas.tolist()
    assert block["k_diffusion_sigmas"] == sigmas[:-1] + [0.0] and len(block["k_diffusion_sigmas"]) == 7
    assert [float(v) for v in block["comfyui_sigmas"].split(",")] == block["k_diffusion_sigmas"]
    assert block["diffusers_sigmas"] == sigmas
    steps = torch.tensor(block["diffusers_timesteps"], dtype=torch.float64)
    assert steps[0] == 999 and torch.allclose(VPDiscreteSchedule.linear().sigma(steps), exported.sigmas[:-1], rtol=0.02)
    assert (block["solver"], block["order"], block["comfyui_sampler"], block["step_grid_only"]) == ("ipndm", 4, "ipndm", False)


def test_an_edited_consumers_block_is_refused(tmp_path):
    path = _save(tmp_path)
    document = json.loads(path.read_text())
    document["consumers"]["comfyui_sigmas"] = "1.0, 0.0"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="consumers does not match sigmas"):
        load_schedule(path)
    del document["consumers"]  # files without the block (earlier exports) still load
    path.write_text(json.dumps(document))
    assert load_schedule(path).n_steps == 6


def test_decoupled_exports_refuse_step_grid_consumers_unless_asked(tmp_path):
    exported = load_schedule(_save(tmp_path, decoupled=True))
    for consumer in (exported.k_diffusion_sigmas, exported.comfyui_sigmas, exported.diffusers_sigmas):
        with pytest.raises(ValueError, match="cannot honour sigmas_eval: k-diffusion samplers, ComfyUI custom sigmas, "
                                             "diffusers' built-in schedulers; that can: ld3.sampling.sample, .*LD3Scheduler"):
            consumer()
    assert exported.k_diffusion_sigmas(ignore_decoupled=True) == exported.sigmas[:-1].tolist() + [0.0]
    assert exported.consumer_formats()["step_grid_only"] is True


# ---- CLI ----------------------------------------------------------------------------------------
def test_show_prints_the_grid_and_writes_a_png(tmp_path, capsys):
    path = _save(tmp_path, decoupled=True)
    code, out, _ = _run(["show", path, "--plot", tmp_path / "plot.png"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 7 and float(rows[0][1]) == pytest.approx(float(load_schedule(path).sigmas[0]), rel=1e-5)
    assert "decoupled: yes" in out
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convert_writes_each_format_and_they_round_trip(tmp_path, capsys):
    path = _save(tmp_path)
    code, _, _ = _run(["convert", path, "--output-dir", tmp_path / "out"], capsys)
    assert code == 0
    exported, stem = load_schedule(path), path.stem
    k_sigmas = json.loads((tmp_path / "out" / f"{stem}.k_diffusion_sigmas.json").read_text())
    comfy = (tmp_path / "out" / f"{stem}.comfyui_sigmas.txt").read_text().strip()
    assert k_sigmas == exported.sigmas[:-1].tolist() + [0.0]
    assert [float(v) for v in comfy.split(",")] == k_sigmas
    assert json.loads((tmp_path / "out" / f"{stem}.diffusers_sigmas.json").read_text()) == exported.sigmas.tolist()
    assert json.loads((tmp_path / "out" / f"{stem}.diffusers_timesteps.json").read_text()) == exported.diffusers_timesteps()


def test_convert_of_a_decoupled_export_is_an_explicit_choice(tmp_path, capsys):
    path = _save(tmp_path, decoupled=True)
    code, out, err = _run(["convert", path, "--output-dir", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--ignore-decoupled" in err
    assert not (tmp_path / "out").exists()  # nothing written
    code, out, _ = _run(["convert", path, "--ignore-decoupled", "--to", "comfyui", "--output-dir", tmp_path / "out"], capsys)
    assert code == 0 and "sigmas_eval are lost" in out
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{path.stem}.comfyui_sigmas.txt"]


def test_compare_tabulates_learned_against_the_best_baseline(tmp_path, capsys):
    metrics = {"final_val_loss": 0.02, "baseline_edm_rho_final_val_loss": 0.05, "baseline_time_uniform_final_val_loss": 0.04,
               "fd_exact": 0.3, "baseline_time_uniform_fd_exact": 0.9}
    first = _save(tmp_path / "a", n_steps=4, metrics=metrics)
    second = _save(tmp_path / "b", n_steps=6, solver="unipc_bh1", order=3, metrics={"final_val_loss": 0.01})
    code, out, _ = _run(["compare", second, first], capsys)
    assert code == 0
    rows = out.splitlines()[2:]
    assert rows[0].split()[:3] == ["m", "ipndm-o4", "4"]  # sorted by solver, then NFE
    assert "time_uniform" in rows[0] and "0.500" in rows[0] and "0.9000" in rows[0] and "0.3000" in rows[0]
    assert rows[1].split()[:3] == ["m", "unipc_bh1-o3", "6"] and rows[1].split()[5] == "-"


def test_interpolate_resizes_in_log_sigma_and_labels_the_file(tmp_path, capsys):
    path = _save(tmp_path, decoupled=True)
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps(DDPM_CONFIG))
    output = tmp_path / "resized.json"
    code, out, _ = _run(["interpolate", path, "--steps", 9, "--scheduler-config", config, "--output", output], capsys)
    assert code == 0 and "NOT LEARNED" in out
    resized = load_schedule(output)
    # a logSNR-uniform grid stays logSNR-uniform, with the same endpoints
    assert torch.allclose(resized.sigmas, _logsnr_grid(VPDiscreteSchedule.linear(), 9), rtol=1e-12)
    assert resized.mode == "interpolated" and resized.metrics == {} and resized.nfe == 9
    assert "not_learned" in resized.provenance.config and resized.decoupled
    assert torch.equal(resized.sigmas_eval[[0, -1]], resized.sigmas[[0, -1]])
    # the native timesteps are the model's exactly: the diffusers scheduler accepts the file
    from pipeline.consumers.diffusers_scheduler import LD3Scheduler

    assert len(LD3Scheduler.from_export(output, DDPM_CONFIG).timesteps) == 9


def test_interpolating_to_the_same_step_count_is_the_identity():
    sigmas = torch.tensor([80.0, 20.0, 3.0, 0.7, 0.1, 0.002], dtype=torch.float64)
    assert torch.allclose(loglinear_interpolation(sigmas, 5), sigmas, rtol=1e-14)
    doubled = loglinear_interpolation(sigmas, 10)
    assert torch.allclose(doubled[::2], sigmas, rtol=1e-14)
    assert torch.allclose(doubled[1::2], (sigmas[:-1] * sigmas[1:]).sqrt(), rtol=1e-14)  # log-midpoints


def test_interpolate_an_edm_export_needs_no_config(tmp_path, capsys):
    path = _save(tmp_path, EDMSchedule())
    code, _, _ = _run(["interpolate", path, "--steps", 3, "--output", tmp_path / "r.json"], capsys)
    assert code == 0 and load_schedule(tmp_path / "r.json").n_steps == 3
    code, _, err = _run(["interpolate", _save(tmp_path / "vp"), "--steps", 3], capsys)
    assert code == 2 and "scheduler config" in err


def _mutate(path: Path, key: str, value) -> Path:
    document = json.loads(path.read_text())
    document.pop("consumers")
    document[key] = value
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sigmas", [80.0, 1.0], "has 7 points but sigmas has 2"),
    ("sigmas", [80.0, 90.0, 30.0, 10.0, 3.0, 1.0, 0.002], "descending"),
    ("sigmas", [80.0, float("nan"), 30.0, 10.0, 3.0, 1.0, 0.002], "NaN"),
    ("solver", "ddim", "unknown solver 'ddim'"),
    ("order", 7, "order=7 is not supported by ipndm"),
])
def test_bad_export_files_are_one_line_errors(tmp_path, capsys, key, value, message):
    path = _mutate(_save(tmp_path), key, value)
    for command in (["show", path, "--plot", tmp_path / "p.png"], ["convert", path, "--output-dir", tmp_path / "o"]):
        code, _, err = _run(command, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        assert re.search(message, err), err
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "o").exists()


def test_reading_an_export_needs_torch_alone(tmp_path):
    path = _save(tmp_path)
    code = ("import sys; from pipeline.recording.exports import load_schedule; s = load_schedule(sys.argv[1]); s.comfyui_sigmas(); "
            "heavy = [m for m in ('mlflow', 'ray', 'optuna', 'pyarrow', 'matplotlib', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=Path(__file__).resolve().parents[1])
