"""Every per-model study script, for real: ``studies/<model>.py --smoke-test`` runs end to end (tiny random
checkpoint of the model's family -> Parquet teacher cache -> Ray Tune study -> MLflow -> exported JSON), and
bad model input ends in one line on stderr, exit code 2, with nothing written."""

from __future__ import annotations

import json
import logging
import runpy
from pathlib import Path

import diffusers.models.modeling_utils  # noqa: F401 - binds diffusers' log handler to the session's stderr, not one test's
import pytest
import torch
from mlflow import MlflowClient

from pipeline.models.smoke import (
    SMOKE_PROMPTS,
    tiny_edm_pickle,
    tiny_latent_pipeline,
    tiny_pixel_pipeline,
)
from pipeline.recording.exports import load_schedule
from pipeline.teacher.cache import TeacherCache

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
MODEL_STUDIES = ("cifar10", "afhqv2", "ffhq", "lsun_bedroom", "imagenet256", "sd15")
CHECKPOINT_VARIABLES = ("LD3_CIFAR10_CHECKPOINT", "LD3_AFHQV2_CHECKPOINT", "LD3_FFHQ_CHECKPOINT",
                        "LD3_LSUN_BEDROOM_CHECKPOINT", "LD3_IMAGENET256_CHECKPOINT", "LD3_SD15_CHECKPOINT", "LD3_SD15_PROMPTS")


@pytest.fixture(scope="module", autouse=True)
def private_caches(tmp_path_factory):
    """Smoke checkpoints and digests in a private cache home; no LPIPS weights; no checkpoint variables."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        for name in CHECKPOINT_VARIABLES:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(autouse=True)
def restore_root_logging():
    """pipeline.cli.main calls logging.basicConfig, whose handler would outlive this test's captured stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


def script(name: str) -> dict:
    """The globals of studies/<name>.py (its STUDY, SCRIPT, make_config and main)."""
    return runpy.run_path(str(STUDIES_DIR / f"{name}.py"))


def work_args(work: Path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{work}/mlflow.db", "--cache-dir", str(work / "cache"),
            "--exports-dir", str(work / "exports"), "--storage-dir", str(work / "tune")]


# ---- end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_STUDIES)
def test_smoke_study_runs_end_to_end(name, local_ray, tmp_path, capsys):
    study = script(name)
    argv = ["--smoke-test", *work_args(tmp_path)]
    assert study["main"](argv) == 0, capsys.readouterr().err

    config = study["make_config"](study["SCRIPT"].parser().parse_args(argv))
    (export_file,) = (tmp_path / "exports").glob("*/*.json")  # one cell: one solver, one NFE; one folder per study
    assert export_file.parent.name == config.name
    exported = load_schedule(export_file)
    assert (exported.model, exported.solver, exported.nfe) == (config.model.model_id, config.solvers[0].name, config.nfes[0])
    assert exported.model.endswith("-smoke") and exported.sigmas.shape == (exported.nfe + 1,)

    # The teacher data is a cache hit for the same spec (the checkpoint digest is stable) and holds the conditions.
    entry = TeacherCache(str(tmp_path / "cache")).lookup(config.model, config.teacher)
    assert entry is not None and exported.provenance.teacher_cache_key == entry.key
    condition = entry.load().condition
    if name == "sd15":
        assert condition == tuple(SMOKE_PROMPTS[:8])  # prompt text, not embeddings
    elif name == "imagenet256":
        assert sorted(condition.tolist()) == sorted(set(condition.tolist())) and condition.max() < 10
    else:
        assert condition is None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    trial = client.get_run(exported.provenance.mlflow_run_id)
    assert trial.info.status == "FINISHED" and trial.data.params["teacher_cache_key"] == entry.key
    baselines = {run.data.tags["run_key"] for run in client.search_runs([trial.info.experiment_id], "tags.kind = 'baseline'")}
    assert {"gits", "dmn"} <= baselines and ("ays_sd15" in baselines) == (name == "sd15")  # AYS: published for SD 1.5 only


# ---- bad input --------------------------------------------------------------------------------------
TINY_CHECKPOINTS = {  # argv placeholders -> tiny checkpoints in the real formats (written on first use)
    "<pixel-folder>": tiny_pixel_pipeline,
    "<latent-folder>": tiny_latent_pipeline,
    "<edm-3x32x32>": lambda: tiny_edm_pickle((3, 32, 32)),
    "<edm-3x64x64>": lambda: tiny_edm_pickle((3, 64, 64)),
    "<edm-1x64x64>": lambda: tiny_edm_pickle((1, 64, 64)),
}
BAD_INPUT = [
    # wrong checkpoint type for the family
    ("cifar10", ["--checkpoint", "<pixel-folder>"], "is a folder, but the edm family needs an EDM network pickle"),
    ("cifar10", ["--checkpoint", "TMP/model.safetensors"], "is not an EDM network pickle"),
    ("lsun_bedroom", ["--checkpoint", "<edm-3x32x32>"], "must be a diffusers pipeline folder, got the file"),
    ("lsun_bedroom", ["--checkpoint", "<pixel-folder>"], "no autoencoder"),
    ("sd15", ["--checkpoint", "<latent-folder>"], "not a Stable Diffusion v1.x pipeline"),
    # images of another size or channel count than the study's
    ("cifar10", ["--checkpoint", "<edm-3x64x64>"], "makes 3×64×64 images, but this study expects 3×32×32"),
    ("ffhq", ["--checkpoint", "<edm-1x64x64>"], "makes 1×64×64 images, but this study expects 3×64×64"),
    ("lsun_bedroom", ["--checkpoint", "<latent-folder>"], "makes 3×16×16 images, but this study expects 3×256×256"),
    # prompt files in the wrong format, too short or missing
    ("sd15", ["--smoke-test", "--prompts", "TMP/list.json"], "is not an MS-COCO captions JSON"),
    ("sd15", ["--smoke-test", "--prompts", "TMP/prompts.csv"], "must be an MS-COCO captions .json or a .txt"),
    ("sd15", ["--smoke-test", "--prompts", "TMP/three.txt"], "holds 3 prompts; this study needs 8"),
    ("sd15", ["--smoke-test", "--prompts", "TMP/captions_val2014.json"], "prompt file 'captions_val2014.json' not found"),
    # conditioning that does not fit the network
    ("cifar10", ["--smoke-test", "--class-labels", "3"], "--class-labels was given, but"),
    ("imagenet256", ["--smoke-test", "--checkpoint", "<latent-folder>"], "needs a conditional model; this one is unconditional"),
    ("imagenet256", ["--smoke-test", "--class-labels", "3,12"], "--class-labels must be comma-separated class ids in [0, 10)"),
    # missing checkpoint (from the flag, from the default location) and missing LPIPS weights
    ("afhqv2", ["--checkpoint", "TMP/edm-afhqv2-64x64-uncond-vp.pkl"],
     "(from --checkpoint); download edm-afhqv2-64x64-uncond-vp.pkl from https://"),
    ("cifar10", [], "checkpoints/edm-cifar10-32x32-uncond-vp.pkl (from the default location"),
    ("imagenet256", [], "huggingface-cli download facebook/DiT-XL-2-256"),
    ("cifar10", ["--checkpoint", "<edm-3x32x32>"], "LPIPS (vgg) needs the ImageNet weights"),
]


def write_bad_inputs(tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp / "list.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp / "prompts.csv").write_text("prompt\na cat\n")
    (tmp / "three.txt").write_text("a cat\na dog\na cup\n")


def resolve_argv(argv: list[str], tmp: Path) -> list[str]:
    return [str(TINY_CHECKPOINTS[a]()) if a in TINY_CHECKPOINTS else a.replace("TMP", str(tmp)) for a in argv]


@pytest.mark.parametrize("name, argv, message", BAD_INPUT, ids=[f"{c[0]}-{c[2][:30]}" for c in BAD_INPUT])
def test_bad_model_input_is_one_line_exit_2_and_writes_nothing(name, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default checkpoint location is relative to the working directory
    write_bad_inputs(tmp_path)
    work = tmp_path / "work"
    assert script(name)["main"]([*resolve_argv(argv, tmp_path), *work_args(work)]) == 2
    *before, last = capsys.readouterr().err.strip().splitlines()  # before: library progress bars, if any
    assert last.startswith("error: ") and message in last, last
    assert not any(line.startswith(("error", "Traceback")) for line in before), before
    assert not work.exists()


def test_checkpoint_variable_is_the_fallback_of_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LD3_CIFAR10_CHECKPOINT", str(tmp_path / "from-env.pkl"))
    assert script("cifar10")["main"](work_args(tmp_path / "work")) == 2
    err = capsys.readouterr().err
    assert "from-env.pkl" in err and "(from $LD3_CIFAR10_CHECKPOINT)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_trials_without_gpus_are_refused_before_anything_runs(tmp_path, capsys):
    argv = ["--smoke-test", "--gpus-per-trial", "0.5", *work_args(tmp_path / "work")]
    assert script("ffhq")["main"](argv) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err and not (tmp_path / "work").exists()


@pytest.mark.parametrize("flags, graphs, solve_batch", [([], False, None), (["--cuda-graphs"], True, 4)])
def test_cuda_graphs_flag_sets_the_trainer_speed_options(tmp_path, flags, graphs, solve_batch):
    study = script("cifar10")
    config = study["make_config"](study["SCRIPT"].parser().parse_args(["--smoke-test", *flags, *work_args(tmp_path)]))
    assert (config.trainer.cuda_graphs, config.trainer.val_solve_batch_size) == (graphs, solve_batch)
    assert config.num_validation == 4 and config.trainer.loss == "l2"  # the rest of the smoke recipe is untouched
