"""The digits model's shipped weights files and their sha256 digests: plain data, no torch, so a study's
``ModelSpec`` (whose cache key holds the digest) is built without loading the network."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DENOISER_FILE, CLASSIFIER_FILE = "digits-edm.safetensors", "digits-classifier.safetensors"
#: sha256 of the shipped files (written by ``python -m ld3.digits.train``; bench/RESULTS.md, "Digits model").
SHIPPED: dict[str, str] = {
    DENOISER_FILE: "2d6a4ee6ae01925197d2e706fd15d7c7ee20f2629d7824f6eaa22b2ae22ba0ff",
    CLASSIFIER_FILE: "49b3518458546c2457dfacd3f516a8882a9fffe840406d9f62bd868bf4df44f4",
}


def shipped_path(name: str) -> Path:
    """Path of a shipped weights file (DENOISER_FILE or CLASSIFIER_FILE)."""
    return WEIGHTS_DIR / name
