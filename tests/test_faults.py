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
from pipeline.smoke_models import tiny_edm_pickle

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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["os_system.pkl", "xdg"]  # no cache/exports/mlflow


def test_smoke_checkpoint_loads_without_opt_in_and_its_digest_is_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv("LD3_TRUST_CHECKPOINT_CODE", raising=False)
    net = load_edm_network(tiny_edm_pickle((3, 8, 8)))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert net(x, torch.tensor([0.5, 2.0])).shape == x.shape
