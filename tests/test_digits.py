"""The shipped digits model (ld3.digits): weights verified on load, a denoiser that denoises the real data,
a sample-quality metric with a measured floor, a teacher within 2× that floor, training that is seeded,
and a short study on it end to end (Ray, MLflow, exports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ld3.digits.checkpoint import CheckpointDigestError, load_weights
from ld3.digits.data import HELD_OUT, N_CLASSES, SHAPE, load_split
from ld3.digits.denoiser import DigitsDenoiser, load_digits_denoiser
from ld3.digits.quality import DigitsQuality
from ld3.digits.shipped import CLASSIFIER_FILE, DENOISER_FILE, SHIPPED, shipped_path
from ld3.discretizations import get_baseline
from ld3.losses import MissingWeightsError
from ld3.models.base import classifier_free_guidance
from ld3.sampling import sample
from ld3.utils import latents_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def denoiser() -> DigitsDenoiser:
    return load_digits_denoiser()


@pytest.fixture(scope="module")
def quality() -> DigitsQuality:
    return DigitsQuality()


def test_data_splits_are_disjoint_and_complete():
    x_train, y_train = load_split("train")
    x_held, y_held = load_split("heldout")
    assert x_train.shape[1:] == SHAPE and len(x_held) == HELD_OUT and len(x_train) + len(x_held) == 1797
    assert x_train.min() >= -1 and x_train.max() <= 1
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    assert sum(tuple(r) in train_rows for r in x_held.flatten(1).tolist()) < 5  # the data set has a few duplicates
    assert set(y_held.tolist()) == set(range(N_CLASSES))


@pytest.mark.parametrize("name", [DENOISER_FILE, CLASSIFIER_FILE])
def test_shipped_weights_match_their_digest(name):
    _, config, digest = load_weights(shipped_path(name), SHIPPED[name])
    assert digest == SHIPPED[name] and config["kind"] in ("denoiser", "classifier")


def test_altered_or_missing_weights_are_one_line_errors(tmp_path):
    altered = tmp_path / DENOISER_FILE
    data = bytearray(shipped_path(DENOISER_FILE).read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(CheckpointDigestError) as err:
        load_weights(altered, SHIPPED[DENOISER_FILE])
    message = str(err.value)
    assert "\n" not in message and str(altered) in message and SHIPPED[DENOISER_FILE] in message
    with pytest.raises(MissingWeightsError, match="nowhere.safetensors"):
        load_digits_denoiser(tmp_path / "nowhere.safetensors")
    not_weights = tmp_path / "junk.safetensors"
    not_weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a digits weights file"):
        load_digits_denoiser(not_weights)


def test_denoiser_denoises_held_out_digits(denoiser):
    x0, labels = load_split("heldout")
    gen = torch.Generator().manual_seed(0)
    for sigma in (0.1, 0.5, 2.0):
        noisy = x0 + sigma * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            d_cond = denoiser(noisy, torch.tensor(sigma), labels)
            d_null = denoiser(noisy, torch.tensor(sigma))
        assert torch.isfinite(d_cond).all() and torch.isfinite(d_null).all()
        err_cond, err_null = (d_cond - x0).square().mean().item(), (d_null - x0).square().mean().item()
        noise_mse = sigma**2
        assert err_null < 0.7 * min(noise_mse, x0.var().item())  # better than the noisy input and the data mean
        assert err_cond <= err_null * 1.05  # the true class helps (or at least does not hurt)


def test_guidance_combines_conditional_and_null_outputs(denoiser):
    x = latents_from_seeds(range(6), SHAPE) * 3.0
    labels = torch.arange(6) % N_CLASSES
    guided = load_digits_denoiser(guidance_scale=2.5)
    with torch.no_grad():
        expected = classifier_free_guidance(denoiser(x, 3.0), denoiser(x, 3.0, labels), 2.5)
        torch.testing.assert_close(guided(x, 3.0, labels), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="class ids"):
        denoiser(x, 3.0, torch.full((6,), N_CLASSES))
    with pytest.raises(ValueError, match="conditional"):
        load_digits_denoiser(conditional=False, guidance_scale=2.0)


def test_quality_metric_floor_and_sensitivity(quality):
    x_held, y_held = load_split("heldout")
    assert quality.accuracy(x_held, y_held) > 0.97
    floor = quality.floor()
    assert 0 < floor < 50
    blurred = torch.nn.functional.avg_pool2d(x_held, 3, stride=1, padding=1, count_include_pad=False)
    assert quality.frechet_distance(blurred) > 3 * floor  # a visibly damaged set scores far worse than real data


def test_teacher_is_within_twice_the_floor(denoiser, quality):
    """The study's teacher (UniPC-3, NFE 20, EDM ρ=7), class-conditional: FD of 1,000 samples < 2 × floor."""
    labels = torch.arange(1000) % N_CLASSES
    sigmas = get_baseline("edm_rho")(20, denoiser.schedule)
    x = sample(denoiser, "unipc_bh1", 3, sigmas, latents_from_seeds(range(10**6, 10**6 + 1000), SHAPE), cond=labels,
               batch_size=500)
    assert quality.frechet_distance(x) < 2 * quality.floor()
    assert quality.accuracy(x, labels) > 0.95


def test_training_is_seeded_and_writes_loadable_weights(tmp_path):
    args = ["--steps", "3", "--classifier-steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu"]
    digests = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-m", "ld3.digits.train", "--out", str(tmp_path / run), *args], cwd=ROOT,
                       check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", **_env()})
        digests.append(json.loads((tmp_path / run / "train-metrics.json").read_text())["digests"])
    assert digests[0] == digests[1]
    retrained = load_digits_denoiser(tmp_path / "a" / DENOISER_FILE)
    assert retrained.digest == digests[0][DENOISER_FILE]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_digits_smoke_study_end_to_end(tmp_path):
    from mlflow import MlflowClient

    from pipeline.recording.exports import load_schedule

    work = tmp_path
    cmd = [sys.executable, str(ROOT / "studies" / "digits.py"), "--smoke-test", "--num-cpus", "2",
           "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--cache-dir", str(work / "cache"),
           "--exports-dir", str(work / "exports"), "--storage-dir", str(work / "tune")]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    exports = list((work / "exports").rglob("*.json"))
    assert exports, done.stdout
    exported = load_schedule(exports[0])
    assert exported.solver == "unipc_bh1"
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.kind = 'baseline'")
    assert runs and all({"fd_classifier", "class_accuracy"} <= set(r.data.metrics) for r in runs)
    assert all(0.0 <= r.data.metrics["class_accuracy"] <= 1.0 for r in runs)


def test_digits_study_rejects_guidance_without_classes(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "digits.py"), "--unconditional", "--guidance-scale", "2",
                           "--exports-dir", str(tmp_path / "exports"), "--cache-dir", str(tmp_path / "cache"),
                           "--storage-dir", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--unconditional" in lines[0]
    assert not any(tmp_path.iterdir())
