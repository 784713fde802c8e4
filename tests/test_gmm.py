"""The embedded exact model: Tweedie's formula, exact sampling and moments, conditioning, stability."""

import math

import pytest
import torch

from ld3.metrics import gaussian_moments
from ld3.models.gmm import GaussianMixture, default_gmm


@pytest.fixture(scope="module")
def gmm():
    return default_gmm(seed=0)


def tweedie(gmm: GaussianMixture, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """x + sigma^2 grad log p_sigma(x), by autograd of the mixture log-density."""
    x = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(gmm.log_prob(x, sigma, cond).sum(), x)
    return x.detach() + sigma.view(-1, 1, 1, 1) ** 2 * score


def test_denoiser_equals_tweedie_over_the_whole_sigma_range(gmm):
    gen = torch.Generator().manual_seed(1)
    sigmas = torch.logspace(math.log10(0.002), math.log10(80), 24, dtype=torch.float64)
    x0 = gmm.sample(24, gen)
    x = x0 + sigmas.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    expected = tweedie(gmm, x, sigmas)
    got = gmm(x, sigmas)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_conditional_denoiser_equals_tweedie_of_the_class_density(gmm):
    gen = torch.Generator().manual_seed(2)
    cond = torch.arange(8) % gmm.n_classes
    sigmas = torch.logspace(-2, 1.5, 8, dtype=torch.float64)
    x = torch.randn((8, *gmm.shape), generator=gen, dtype=torch.float64) * 2
    torch.testing.assert_close(gmm(x, sigmas, cond), tweedie(gmm, x, sigmas, cond), rtol=1e-9, atol=1e-9)
    # Conditioning must matter: the unconditional posterior mean differs.
    assert (gmm(x, sigmas, cond) - gmm(x, sigmas)).abs().max() > 1e-3


def test_float32_is_stable_and_close_to_float64(gmm):
    gen = torch.Generator().manual_seed(3)
    g32 = gmm.to(dtype=torch.float32)
    for sigma in (0.002, 0.1, 1.0, 80.0):
        x = gmm.sample(16, gen) + sigma * torch.randn((16, *gmm.shape), generator=gen, dtype=torch.float64)
        s = torch.full((16,), sigma, dtype=torch.float64)
        d64 = gmm(x, s)
        d32 = g32(x.float(), s.float())
        assert torch.isfinite(d32).all()
        assert (d32.double() - d64).abs().max() < 1e-4 * max(1.0, sigma)


def test_exact_moments_match_many_samples(gmm):
    x = gmm.sample(60_000, torch.Generator().manual_seed(4))
    mu, cov = gaussian_moments(x)
    assert (mu - gmm.mean()).abs().max() < 0.02
    assert (cov - gmm.covariance()).abs().max() < 0.02
    for c in range(gmm.n_classes):
        xc = gmm.sample(20_000, torch.Generator().manual_seed(5 + c), cond=torch.tensor([c]))
        assert (xc.flatten(1).mean(0) - gmm.mean(c)).abs().max() < 0.03


def test_denoiser_limits(gmm):
    """sigma -> infinity gives the data mean; sigma -> 0 gives (almost) the identity."""
    x = torch.randn((4, *gmm.shape), dtype=torch.float64)
    big = gmm(x, torch.full((4,), 1e4, dtype=torch.float64))
    torch.testing.assert_close(big.flatten(1), gmm.mean().expand(4, -1), atol=1e-3, rtol=0)
    x0 = gmm.sample(4, torch.Generator().manual_seed(6))
    torch.testing.assert_close(gmm(x0, torch.full((4,), 1e-5, dtype=torch.float64)), x0, atol=1e-6, rtol=0)


def test_default_gmm_is_reproducible_and_any_shape():
    a, b = default_gmm(seed=7), default_gmm(seed=7)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds)
    assert not torch.equal(a.means, default_gmm(seed=8).means)
    big = default_gmm(seed=0, shape=(1, 5, 13), n_components=3, n_classes=0)
    assert big.shape == (1, 5, 13) and big.n_classes == 0
    x = torch.randn(2, 1, 5, 13, dtype=torch.float64)
    assert big(x, torch.ones(2, dtype=torch.float64)).shape == x.shape


def test_bad_input_is_a_clear_error(gmm):
    x = torch.randn((2, *gmm.shape), dtype=torch.float64)
    with pytest.raises(ValueError, match="x must have shape"):
        gmm(torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must have shape"):
        gmm(x, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="class ids"):
        gmm(x, torch.ones(2, dtype=torch.float64), torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="unconditional"):
        default_gmm(n_classes=0)(x, torch.ones(2, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(gmm.means, -gmm.stds, gmm.log_weights.exp())
