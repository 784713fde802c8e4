"""Fréchet distance between Gaussians: closed forms, invariances, bad input."""

import math

import pytest
import torch

from ld3.metrics import frechet_distance, gaussian_moments, gmm_frechet_distance
from ld3.models.gmm import default_gmm


def random_spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / d


def test_identical_gaussians_are_at_distance_zero():
    cov = random_spd(20, 0)
    mu = torch.randn(20, dtype=torch.float64)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_commuting_covariances_closed_form():
    """For diagonal covariances d² = |Δμ|² + Σ (√a − √b)²."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(30, generator=g, dtype=torch.float64) + 0.1, torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    m1, m2 = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert math.isclose(frechet_distance(m1, torch.diag(a), m2, torch.diag(b)), expected, rel_tol=1e-10)


def test_symmetric_and_stable_for_singular_covariances():
    c1, c2 = random_spd(40, 2, rank=5), random_spd(40, 3, rank=7)
    m = torch.zeros(40, dtype=torch.float64)
    d12, d21 = frechet_distance(m, c1, m, c2), frechet_distance(m, c2, m, c1)
    assert math.isfinite(d12) and d12 > 0
    assert math.isclose(d12, d21, rel_tol=1e-8)


def test_gmm_frechet_distance_shrinks_with_more_exact_samples():
    gmm = default_gmm(seed=0)
    few = gmm_frechet_distance(gmm.sample(1_000, torch.Generator().manual_seed(0)), gmm)
    many = gmm_frechet_distance(gmm.sample(20_000, torch.Generator().manual_seed(1)), gmm)
    shifted = gmm_frechet_distance(gmm.sample(20_000, torch.Generator().manual_seed(1)) + 0.1, gmm)
    assert many < few
    assert shifted > many + 0.1**2 * gmm.dim * 0.9


def test_bad_input():
    cov = random_spd(4, 0)
    with pytest.raises(ValueError, match="cov2 must have shape"):
        frechet_distance(torch.zeros(4), cov, torch.zeros(4), torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4,), float("nan")), cov, torch.zeros(4), cov)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_moments(torch.zeros(1, 4))
    with pytest.warns(UserWarning, match="rank-deficient"):
        gaussian_moments(torch.randn(3, 4))
