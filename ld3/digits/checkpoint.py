"""Weights files of the digits model: safetensors tensors + a JSON config in the header, sha256-verified.

A safetensors file holds only tensors and a string header, so loading one runs no code. The config
(``kind``, the network's constructor arguments, the preconditioning's σ_data, how it was trained) lives
in the header's metadata. The files shipped in ``ld3/digits/weights/`` are checked against the digests
in ``ld3.digits.shipped.SHIPPED``; a file of your own is loaded as it is and its digest reported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ld3.digits.networks import DigitsClassifier, DigitsUNet
from ld3.losses import MissingWeightsError


class CheckpointDigestError(ValueError):
    """A weights file's sha256 differs from the one it must have."""


def save_weights(path: str | Path, module: nn.Module, config: dict[str, Any]) -> str:
    """Write ``module``'s state dict (float32, contiguous) and ``config`` to ``path`` atomically; return its sha256."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    data = save(tensors, metadata={"config": json.dumps(config, sort_keys=True)})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def load_weights(path: str | Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, config, sha256) of a weights file; ``expected_sha256`` is enforced unless None."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"digits weights file {path} not found; reinstall the package (it ships ld3/digits/weights/) "
            "or retrain with `python -m ld3.digits.train --out DIR` and pass that file"
        )
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if expected_sha256 and actual != expected_sha256:
        raise CheckpointDigestError(
            f"{path} has sha256 {actual}, expected {expected_sha256}: the file was altered or is not the shipped "
            "one; reinstall the package, or pass your own retrained file explicitly"
        )
    try:
        state = load(data)
        with safe_open(str(path), framework="pt") as handle:
            config = json.loads((handle.metadata() or {})["config"])
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a digits weights file (safetensors with a config header): {err}") from None
    return state, config, actual


NETWORKS: dict[str, type[nn.Module]] = {"denoiser": DigitsUNet, "classifier": DigitsClassifier}


def build_network(path: str | Path, expected_sha256: str | None, kind: str) -> tuple[nn.Module, dict[str, Any], str]:
    """Load a weights file of ``kind`` ("denoiser" or "classifier") into a new network, eval mode, frozen."""
    state, config, digest = load_weights(path, expected_sha256)
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r} network, expected a {kind!r} one")
    net = NETWORKS[kind](**config["network"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), config, digest
