"""Sample quality on the digits domain, offline: a Fréchet distance in a classifier's feature space.

The shipped classifier (:class:`~ld3.digits.networks.DigitsClassifier`, trained on the training split)
maps an 8×8 image to its 64 penultimate-layer features. The *classifier Fréchet distance* of a set of
samples is the Fréchet distance between the Gaussian moments of their features and those of the
training split — the recipe of FID (Heusel et al. 2017) with a domain network in place of Inception.
It is an FID analogue for this domain, not FID: its numbers are not comparable with published FIDs.
Its floor, the distance of the held-out split (360 real images) to the training split, is what real
data of that size scores. ``accuracy`` is the share of class-conditional samples that the classifier
puts in the class they were asked for.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from ld3.digits.checkpoint import build_network
from ld3.digits.data import load_split
from ld3.digits.shipped import CLASSIFIER_FILE, SHIPPED, shipped_path
from ld3.metrics import frechet_distance, gaussian_moments


class DigitsQuality:
    """Classifier features, Fréchet distance to the training split and class accuracy of digit samples."""

    def __init__(self, path: str | Path | None = None, *, device: torch.device | str = "cpu",
                 data_source: str | Path | None = None, batch_size: int = 1000):
        expected = SHIPPED[CLASSIFIER_FILE] if path is None else None
        net, self.config, self.digest = build_network(path or shipped_path(CLASSIFIER_FILE), expected, "classifier")
        self.net, self.device, self.batch_size, self.data_source = net.to(device), torch.device(device), batch_size, data_source

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [N, 64] (float64) of images [N, 1, 8, 8] in [-1, 1] (clamped there first)."""
        parts = [self.net.features(chunk.to(self.device, torch.float32).clamp(-1, 1)).double().cpu()
                 for chunk in images.split(self.batch_size)]
        return torch.cat(parts)

    @cached_property
    def reference(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the training split's features (the target of every distance)."""
        return gaussian_moments(self.features(load_split("train", self.data_source)[0]))

    def frechet_distance(self, images: Tensor) -> float:
        """Classifier Fréchet distance of ``images`` to the training split (module docstring)."""
        return frechet_distance(*gaussian_moments(self.features(images)), *self.reference)

    @torch.no_grad()
    def correct(self, images: Tensor, labels: Tensor) -> int:
        """How many of ``images`` the classifier assigns to their ``labels``."""
        logits = torch.cat([self.net(chunk.to(self.device, torch.float32).clamp(-1, 1)).cpu()
                            for chunk in images.split(self.batch_size)])
        return int((logits.argmax(1) == labels.cpu()).sum())

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Share of ``images`` that the classifier assigns to ``labels``."""
        return self.correct(images, labels) / len(images)

    def floor(self) -> float:
        """The held-out split's distance to the training split: what real data of that size scores."""
        return self.frechet_distance(load_split("heldout", self.data_source)[0])
