"""The digits data: scikit-learn's bundled 8×8 handwritten digits, scaled to [-1, 1], with a held-out split.

The images come inside the scikit-learn wheel (``sklearn.datasets.load_digits``; UCI "Optical Recognition
of Handwritten Digits", 1,797 images of 16 grey levels), so nothing is downloaded at run time. The split is
fixed: a seeded permutation, the last ``HELD_OUT`` images held out from training of both networks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

SHAPE = (1, 8, 8)
N_CLASSES = 10
HELD_OUT = 360  # ~20 % of the 1,797 images, never seen by the denoiser or the classifier during training
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")


def _all_digits(source: str | Path | None) -> tuple[Tensor, Tensor]:
    """All 1,797 images [N, 1, 8, 8] in [-1, 1] and labels [N], from scikit-learn or an ``.npz`` copy."""
    if source is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the digits data comes with scikit-learn: pip install scikit-learn") from None
        bunch = load_digits()
        images, labels = bunch.images, bunch.target
    else:
        import numpy as np

        with np.load(source) as archive:
            images, labels = archive["images"], archive["labels"]
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, *SHAPE) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return x, torch.as_tensor(labels, dtype=torch.long)


def load_split(split: str = "train", source: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images [N, 1, 8, 8] (float32 in [-1, 1]) and labels [N] of one split: "train", "heldout" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    x, y = _all_digits(source)
    if split == "all":
        return x, y
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    index = order[:-HELD_OUT] if split == "train" else order[-HELD_OUT:]
    return x[index], y[index]


def save_npz(path: str | Path) -> Path:
    """Copy scikit-learn's raw digits into an ``.npz`` (for machines without scikit-learn, e.g. a GPU box)."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.savez_compressed(path, images=bunch.images, labels=bunch.target)
    return Path(path)
