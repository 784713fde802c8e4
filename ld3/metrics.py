"""Fréchet distances: between Gaussians, and between samples and the GMM's exact moments."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ld3.models.gmm import GaussianMixture


def _sym_sqrt_psd(mat: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negatives clipped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    d² = |mu1 - mu2|² + tr(cov1 + cov2 - 2 (cov1^½ cov2 cov1^½)^½). Both matrix square roots are of
    symmetric PSD matrices, so they are taken by eigendecomposition: stable even for singular
    covariances, where scipy's general ``sqrtm`` of ``cov1 @ cov2`` can return complex noise.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64) for c in (cov1, cov2))
    d = mu1.numel()
    for name, value, shape in (("mu2", mu2, (d,)), ("cov1", cov1, (d, d)), ("cov2", cov2, (d, d))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1 of dimension {d}, got {tuple(value.shape)}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    root1 = _sym_sqrt_psd(cov1)
    cross = _sym_sqrt_psd(root1 @ cov2 @ root1)
    value = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross)
    return float(value.clamp(min=0))


def gaussian_moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and unbiased covariance of flattened samples [N, ...], float64."""
    x = torch.as_tensor(samples).reshape(samples.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
    if x.shape[0] <= x.shape[1]:
        warnings.warn(
            f"{x.shape[0]} samples for dimension {x.shape[1]}: the covariance is rank-deficient and the "
            "Fréchet distance is biased upwards; use more samples than dimensions",
            stacklevel=2,
        )
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def mixture_moments(gmm: GaussianMixture, conditions: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Exact mean and covariance of the data the GMM generates: the whole mixture (``conditions`` None), or the
    mixture of classes that ``conditions`` (one class id per sample) select, weighted by their counts."""
    counts = Counter(int(c) for c in conditions) if conditions is not None else None
    if counts is None or len(counts) == 1:
        cond = None if counts is None else next(iter(counts))
        return gmm.mean(cond), gmm.covariance(cond)
    n = sum(counts.values())
    mean = sum(k * gmm.mean(c) for c, k in counts.items()) / n
    second = sum(k * (gmm.covariance(c) + torch.outer(gmm.mean(c), gmm.mean(c))) for c, k in counts.items())
    return mean, second / n - torch.outer(mean, mean)


def gmm_frechet_distance(samples: Tensor, gmm: GaussianMixture, cond: int | None = None) -> float:
    """Fréchet distance between the moments of ``samples`` and the GMM's exact data moments (no features)."""
    if tuple(samples.shape[1:]) != gmm.shape:
        raise ValueError(f"samples must have shape [N, {', '.join(map(str, gmm.shape))}], got {tuple(samples.shape)}")
    mu, cov = gaussian_moments(samples)
    return frechet_distance(mu, cov, *mixture_moments(gmm, None if cond is None else [cond]))
