"""Faults caused for real: hostile checkpoints, inconsistent files, bad input, corrupt and non-finite data.

Each test makes the fault happen (a pickle whose payload would write a marker file, a damaged Parquet
part, a denoiser that returns Inf, a study command line with a bad flag) and asserts what the user sees:
a one-line error naming what is wrong, and no side effect (no marker, no folder, nothing published).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ld3.models.edm import UntrustedCodeError, load_edm_network
from pipeline.models.smoke import tiny_edm_pickle

REPO = Path(__file__).resolve().parents[1]


# ---- A: hostile pickles ------------------------------------------------------------------------------------
class _Payload:
    """Pickles as a call ``function(*args)`` that writes the marker file when unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _hostile_payloads(marker: Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').write('pwned')"
    inner = pickle.dumps(_Payload(os.system, f"touch {marker}"))
    return {
        "os_system": _Payload(os.system, f"touch {marker}"),
        "eval": _Payload(eval, touch),
        "exec": _Payload(exec, touch),
        "subprocess_run": _Payload(subprocess.run, ["touch", str(marker)]),
        # torch's own storage rebuilder unpickles nested bytes with no restriction
        "nested_storage_bytes": _Payload(torch.storage._load_from_bytes, inner),
        # the EDM persistence format: module source that runs when the network is rebuilt
        "embedded_source": _EmbeddedSource(f"import os\nos.system('touch {marker}')\nclass Net:\n    pass\n"),
    }


class _EmbeddedSource:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        from ld3.models import edm

        meta = dict(type="class", version=6, module_src=self.source, class_name="Net", state={})
        return edm._reconstruct_persistent_obj, (meta,)


def _write_hostile(folder: Path, name: str, payload: object) -> Path:
    path = folder / f"{name}.pkl"
    data = pickle.dumps({"ema": payload}, protocol=0)  # text GLOBAL opcodes: the module name can be swapped
    path.write_bytes(data.replace(b"cld3.models.edm\n", b"ctorch_utils.persistence\n"))
    return path


@pytest.mark.parametrize("name", ["os_system", "eval", "exec", "subprocess_run", "nested_storage_bytes",
                                  "embedded_source"])
def test_hostile_pickle_is_refused_without_running_its_payload(tmp_path, monkeypatch, name):
    monkeypatch.delenv("LD3_TRUST_CHECKPOINT_CODE", raising=False)
    marker = tmp_path / "marker"
    path = _write_hostile(tmp_path, name, _hostile_payloads(marker)[name])
    with pytest.raises(ValueError) as caught:
        load_edm_network(path)
    message = str(caught.value)
    assert str(path) in message.splitlines()[0]
    if name != "nested_storage_bytes":  # refused by torch's weights-only reader, inside the storage record
        assert isinstance(caught.value, UntrustedCodeError) and len(message.splitlines()) == 1
        assert "--trust-checkpoint-code" in message and "LD3_TRUST_CHECKPOINT_CODE=1" in message
    assert not marker.exists()


def test_hostile_checkpoint_through_the_study_script_is_refused_and_not_recorded(tmp_path):
    marker = tmp_path / "marker"
    path = _write_hostile(tmp_path, "os_system", _hostile_payloads(marker)["os_system"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("LD3_TRUST_CHECKPOINT_CODE", None)
    proc = subprocess.run([sys.executable, str(REPO / "studies/cifar10.py"), "--checkpoint", str(path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: refusing to load") and "posix.system" in errors[0]
    assert not marker.exists()
    digests = tmp_path / "xdg" / "ld3" / "checkpoint-digests.json"
    assert not digests.exists() or str(path) not in digests.read_text()
    # no cache/exports/mlflow (xdg: caches of the libraries imported before the refusal, e.g. matplotlib's fonts)
    assert {p.name for p in tmp_path.iterdir()} <= {"os_system.pkl", "xdg"}


def test_smoke_checkpoint_loads_without_opt_in_and_its_digest_is_recorded_only_then(tmp_path, monkeypatch):
    from pipeline.models.checkpoints import checkpoint_digest, record_checkpoint_digest

    monkeypatch.delenv("LD3_TRUST_CHECKPOINT_CODE", raising=False)
    path = tiny_edm_pickle((3, 8, 8))
    digests = tmp_path / "checkpoint-digests.json"
    digest = checkpoint_digest(path, digests, record=False)  # as the study scripts do before loading
    assert not digests.exists()
    net = load_edm_network(path)  # its classes are registered as safe: no code from the file runs
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert net(x, torch.tensor([0.5, 2.0])).shape == x.shape
    record_checkpoint_digest(path, digests)
    assert list(json.loads(digests.read_text()).values()) == [digest]


# ---- E: inconsistent exports and FID statistics -------------------------------------------------------------
def _saved_export(folder: Path) -> Path:
    from ld3.discretizations import edm_rho
    from ld3.schedules import EDMSchedule
    from pipeline.recording.exports import build_export, save_export

    schedule = EDMSchedule()
    sigmas = edm_rho(4, schedule)
    exported = build_export(sigmas=sigmas, noise_schedule=schedule, model="m", solver="ipndm", order=4, nfe=4,
                            mode="lambda", metrics={}, config={}, teacher_cache_key="k")
    return save_export(exported, folder)


BAD_EXPORTS = {  # field edits -> what the one-line error must say
    "nfe_99": ({"nfe": 99}, "nfe is 99 but ipndm spends 4 denoiser calls on 4 steps"),
    "order_9": ({"order": 9}, "order=9 is not supported by ipndm"),
    "unknown_solver": ({"solver": "rk45"}, "unknown solver 'rk45'"),
    "unknown_schedule": ({"noise_schedule": "karras"}, "noise_schedule 'karras' is unknown"),
    "timesteps_off": ({"timesteps": [70.0, 10.0, 1.0, 0.1, 0.002]}, "timesteps must equal sigmas for the edm schedule"),
    "sigma0_1e6": ({"sigmas": [1e6, 10.0, 1.0, 0.1, 0.002], "timesteps": [1e6, 10.0, 1.0, 0.1, 0.002]},
                   "outside [1e-05, 10000]"),
    "sigma_1e300": ({"sigmas": [1e300, 1e100, 1.0, 1e-100, 1e-300], "timesteps": [1e300, 1e100, 1.0, 1e-100, 1e-300]},
                    "outside [1e-05, 10000]"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_inconsistent_export_is_a_one_line_error_naming_file_and_field(tmp_path, case):
    from pipeline.recording.exports import load_schedule

    path = _saved_export(tmp_path)
    edits, message = BAD_EXPORTS[case]
    path.write_text(json.dumps(json.loads(path.read_text()) | edits))
    with pytest.raises(ValueError) as caught:
        load_schedule(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and len(text.splitlines()) == 1, text


def test_binary_export_names_the_file(tmp_path):
    from pipeline.recording.exports import load_schedule

    path = tmp_path / "schedule.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=f"^{path}: not a UTF-8 JSON text file"):
        load_schedule(path)


def test_reading_an_export_imports_no_mlflow_or_ray(tmp_path):
    path = _saved_export(tmp_path)
    code = ("import sys; from pipeline.recording.exports import load_schedule; load_schedule(sys.argv[1]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'ray', 'optuna', 'pyarrow'}))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_fid_stats_that_are_no_covariance_or_no_npz_are_refused(tmp_path):
    import numpy as np

    from ld3.fid import load_stats

    not_psd = np.diag([1.0, 2.0, -3.0])
    np.savez(tmp_path / "not_psd.npz", mu=np.zeros(3), sigma=not_psd)
    np.savez(tmp_path / "asymmetric.npz", mu=np.zeros(3), sigma=np.eye(3) + np.triu(np.ones((3, 3)), 1))
    np.save(tmp_path / "stats.npy", np.eye(3))
    np.savez(tmp_path / "fine.npz", mu=np.zeros(3), sigma=np.diag([1.0, 2.0, 0.0]))  # singular is fine
    for name, message in (("not_psd.npz", "not positive semi-definite (smallest eigenvalue -3"),
                          ("asymmetric.npz", "not symmetric"), ("stats.npy", "is a single array (.npy)")):
        with pytest.raises(ValueError) as caught:
            load_stats(tmp_path / name, dim=3)
        assert str(tmp_path / name) in str(caught.value) and message in str(caught.value)
        assert len(str(caught.value).splitlines()) == 1
    assert load_stats(tmp_path / "fine.npz", dim=3).mu.numel() == 3


# ---- D: a diverged trial's exception crosses processes --------------------------------------------------------
def _diverged() -> Exception:
    """A TrainingDiverged as the trainer raises it (imports only ld3: Ray workers rebuild this by value)."""
    import torch

    from ld3.train import BestSchedule, TrainingDiverged

    best = BestSchedule(step=3, val_loss=0.5, sigmas=torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64),
                        sigmas_eval=torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64))
    return TrainingDiverged("train loss became NaN/Inf at phase 1, round 0, step 4", 4, best)


def test_training_diverged_survives_pickling():
    original = _diverged()
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is type(original) and str(copy) == str(original) and copy.step == 4
    assert copy.best.step == 3 and torch.equal(copy.best.sigmas, original.best.sigmas)


def test_training_diverged_raised_in_a_ray_worker_reaches_the_driver_intact(local_ray):
    import ray

    from ld3.train import TrainingDiverged

    def fail() -> None:
        raise _diverged()

    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # the workers cannot import this test module
    try:
        with pytest.raises(TrainingDiverged) as caught:
            ray.get(ray.remote(fail).remote())
    finally:
        ray.cloudpickle.unregister_pickle_by_value(this_module)
    assert caught.value.step == 4 and caught.value.best.val_loss == 0.5 and "NaN/Inf" in str(caught.value)


# ---- B: non-finite teacher data is never published --------------------------------------------------------------
@pytest.fixture
def by_value(local_ray):
    """Ray workers rebuild this module's functions by value (they cannot import the tests folder)."""
    import ray

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)


def _inf_below(threshold: float):
    """The exact GMM denoiser, except that it returns +Inf below σ = ``threshold``."""
    from ld3.models.gmm import default_gmm

    gmm = default_gmm(seed=0, shape=(2, 2, 2), n_components=2, n_classes=1)

    def denoiser(x, sigma, cond=None):
        out = gmm(x, sigma, cond)
        return torch.where((sigma < threshold).reshape(-1, 1, 1, 1), torch.full_like(out, float("inf")), out)

    return denoiser, gmm.shape


def _build_inf_model(*, device, dtype, threshold: float):
    from ld3.schedules import EDMSchedule
    from pipeline.models.registry import LoadedModel

    denoiser, shape = _inf_below(threshold)
    return LoadedModel(denoiser=denoiser, schedule=EDMSchedule(), shape=shape)


def test_non_finite_teacher_data_is_refused_naming_model_and_sigma(by_value, tmp_path):
    from pipeline.errors import TeacherGenerationError
    from pipeline.models.registry import register_model_builder
    from pipeline.models.spec import ModelSpec
    from pipeline.teacher.cache import TeacherCache
    from pipeline.teacher.solve import TeacherConfig

    register_model_builder("inf-below-test", _build_inf_model, replace=True)
    spec = ModelSpec("inf-below-test", "inf-below-0.05", kwargs={"threshold": 0.05})
    config = TeacherConfig(solver="euler", order=1, nfe=8, num_samples=6, batch_size=3)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(TeacherGenerationError) as caught:
        cache.get_or_generate(spec, config)
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and "inf-below-0.05" in line and "euler-1, NFE 8" in line, line
    sigma = float(line.split("NaN/Inf at sigma=")[1].split(" ")[0])
    assert 0.002 <= sigma < 0.05  # the first σ of the teacher grid below the threshold
    assert cache.lookup(spec, config) is None
    assert not list((tmp_path / "cache").rglob("*.parquet")) and not list((tmp_path / "cache").rglob("manifest.json"))


# ---- C: a damaged Parquet part of the teacher cache ---------------------------------------------------------------
def _gmm_smoke_study():
    sys.path.insert(0, str(REPO / "studies"))
    try:
        import gmm as gmm_study
    finally:
        sys.path.remove(str(REPO / "studies"))
    return gmm_study


def test_damaged_cache_part_is_named_in_one_line_before_any_hit_is_announced(local_ray, tmp_path, capsys, caplog):
    import argparse

    from pipeline.cli import main
    from pipeline.errors import CacheCorruptError
    from pipeline.teacher.cache import TeacherCache

    gmm_study = _gmm_smoke_study()
    study = gmm_study.make_config(argparse.Namespace(smoke_test=True))
    work = tmp_path / "work"
    cache = TeacherCache(work / "cache")
    entry = cache.get_or_generate(study.model, study.teacher)
    part = Path(entry.folder) / entry.manifest["files"][0]["path"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the Parquet data pages
    part.write_bytes(bytes(data))

    caplog.set_level("INFO", logger="pipeline.teacher.cache")
    with pytest.raises(CacheCorruptError, match=f"cached file {part} does not match its sha256"):
        cache.get_or_generate(study.model, study.teacher)
    assert not any("teacher cache hit" in r.getMessage() for r in caplog.records)

    argv = ["--smoke-test", "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--cache-dir", str(work / "cache"),
            "--exports-dir", str(work / "exports"), "--storage-dir", str(work / "tune")]
    capsys.readouterr()  # Ray Data's progress of the generation above
    assert main(gmm_study.make_config, "test", argv) == 2
    *before, last = capsys.readouterr().err.strip().splitlines()  # before: MLflow's own log lines
    assert last.startswith("error: cached file ") and str(part) in last, last
    assert not any(line.startswith(("error", "Traceback")) or "ray::" in line for line in before), before
    assert not list(work.rglob("*.json.tmp")) and not list((work / "exports").rglob("*.json"))  # nothing exported


# ---- F: bad study input: exit code 2, one error line, nothing written ----------------------------------------------
BAD_FLAGS = [  # flags -> the one error line (first three: a real subprocess); more cases: test_study_cli.py
    (["--num-cpus", "-1"], "--num-cpus -1: Ray needs at least 1 CPU"),
    (["--cpus-per-trial", "64"], "--cpus-per-trial is 64, but this machine's Ray has"),
    (["--cache-dir", "garbage://x"], "--cache-dir: root 'garbage://x' is not a filesystem URI"),
    (["--num-cpus", "0"], "--num-cpus 0: Ray needs at least 1 CPU"),
    (["--nfe", "4,,6"], "--nfe must be comma-separated integers"),
    (["--storage-dir", "garbage://x"], "--storage-dir: root 'garbage://x' is not a filesystem URI"),
    (["--fid-ref", "/missing/ref.npz"], "FID reference statistics /missing/ref.npz not found"),
]
IN_SUBPROCESS = 3


def _run_study_cli(flags: list[str], work: Path, tmp_path: Path, subprocess_run: bool, capsys) -> tuple[int, str]:
    """``studies/gmm.py --smoke-test FLAGS`` in ``work``: (exit code, stderr), as a subprocess or in-process."""
    if subprocess_run:
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "LD3_CACHE_DIR", "LD3_STORAGE_DIR"):
            env.pop(name, None)
        proc = subprocess.run([sys.executable, str(REPO / "studies/gmm.py"), "--smoke-test", *flags], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr
    from pipeline.cli import main

    capsys.readouterr()
    code = main(_gmm_smoke_study().make_config, "test", ["--smoke-test", *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", range(len(BAD_FLAGS)), ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_exit_2_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    flags, message = BAD_FLAGS[case]
    work = tmp_path / "work"  # the study's working directory: default cache, exports, Tune state, mlflow.db
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    code, stderr = _run_study_cli(flags, work, tmp_path, case < IN_SUBPROCESS, capsys)
    *before, last = stderr.strip().splitlines()
    assert code == 2 and last.startswith("error: ") and message in last, stderr
    assert not any(line.startswith(("error", "Traceback")) for line in before), before
    assert not any(work.iterdir())  # no cache, exports, tune, mlflow.db
