"""The embedded default model: a Gaussian mixture in image-shaped space with an exact denoiser.

Data ``x0 ~ sum_k pi_k N(mu_k, diag(s_k^2))`` on C×H×W "images". Under EDM noising
``x = x0 + sigma * eps`` the noisy density is again a mixture, ``p_sigma = sum_k pi_k N(mu_k,
diag(s_k^2 + sigma^2))``, so the ideal denoiser ``D(x, sigma) = E[x0 | x]`` is exact:

    D(x, sigma) = sum_k w_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    w_k(x) = softmax_k(log pi_k + log N(x; mu_k, s_k^2 + sigma^2)).

The softmax is taken with logsumexp, so D is stable from sigma = 0.002 to 80 in float32 and float64.
Class conditioning selects the components of one class (renormalised weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class GaussianMixture:
    """Diagonal-covariance Gaussian mixture over images with an exact EDM denoiser ``D(x, sigma, cond)``.

    Args:
        means: [K, C, H, W] component means.
        stds: [K, C, H, W] per-pixel standard deviations of each component (> 0).
        weights: [K] mixture weights (normalised here).
        classes: optional [K] integer class id of each component; enables ``cond`` (class ids [B]).
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, classes: Tensor | None = None):
        if means.ndim != 4:
            raise ValueError(f"means must have shape [K, C, H, W], got {tuple(means.shape)}")
        if stds.shape != means.shape:
            raise ValueError(f"stds must have the shape of means {tuple(means.shape)}, got {tuple(stds.shape)}")
        if weights.shape != means.shape[:1]:
            raise ValueError(f"weights must have shape [{means.shape[0]}], got {tuple(weights.shape)}")
        if not bool((stds > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("stds and weights must be strictly positive")
        if classes is not None and classes.shape != means.shape[:1]:
            raise ValueError(f"classes must have shape [{means.shape[0]}], got {tuple(classes.shape)}")
        self.means = means
        self.stds = stds
        self.log_weights = torch.log(weights / weights.sum())
        self.classes = None if classes is None else classes.long()

    # ---- description -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_classes(self) -> int:
        return 0 if self.classes is None else int(self.classes.max()) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianMixture:
        """A copy on another device/dtype (weights stay exact: recomputed from log-weights)."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        classes = None if self.classes is None else self.classes.to(device=device)
        return GaussianMixture(move(self.means), move(self.stds), move(self.log_weights.exp()), classes)

    # ---- conditioning ------------------------------------------------------------------------
    def _component_log_weights(self, cond: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """[B, K] log mixture weights, restricted to each sample's class when ``cond`` is given."""
        log_w = self.log_weights.to(like.dtype).expand(batch, -1)
        if cond is None:
            return log_w
        if self.classes is None:
            raise ValueError("cond was given, but this GaussianMixture is unconditional (no classes=)")
        cond = torch.as_tensor(cond, device=like.device).long().reshape(-1)
        if cond.numel() == 1:
            cond = cond.expand(batch)
        if cond.numel() != batch:
            raise ValueError(f"cond must hold one class id per sample ({batch}), got {cond.numel()}")
        if bool(((cond < 0) | (cond >= self.n_classes)).any()):
            raise ValueError(f"class ids in cond must lie in [0, {self.n_classes}), got {cond.tolist()}")
        member = cond[:, None] == self.classes.to(like.device)[None, :]
        masked = log_w.masked_fill(~member, float("-inf"))
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)

    # ---- the noisy density and its exact denoiser --------------------------------------------
    def _responsibilities(self, x: Tensor, var: Tensor, cond: Tensor | None) -> Tensor:
        """[B, K] posterior component probabilities given x under p_sigma (var = s_k^2 + sigma^2)."""
        b = x.shape[0]
        diff2 = (x[:, None] - self.means.to(x.dtype)[None]) ** 2  # [B, K, C, H, W]
        log_norm = -0.5 * (diff2 / var + torch.log(2 * math.pi * var)).flatten(2).sum(-1)  # [B, K]
        return torch.softmax(self._component_log_weights(cond, b, x) + log_norm, dim=1)

    def _noisy_var(self, sigma: Tensor, x: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"sigma must have shape [B] = [{x.shape[0]}] or be a scalar, got {tuple(sigma.shape)}")
        s2 = (self.stds.to(x.dtype) ** 2)[None]  # [1, K, C, H, W]
        return s2 + (sigma**2)[:, None, None, None, None]

    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """Exact denoiser D(x, sigma, cond) = E[x0 | x0 + sigma eps = x]."""
        self._check_x(x)
        var = self._noisy_var(sigma, x)
        resp = self._responsibilities(x, var, cond)  # [B, K]
        mu = self.means.to(x.dtype)[None]
        shrink = (self.stds.to(x.dtype) ** 2)[None] / var
        per_component = mu + shrink * (x[:, None] - mu)  # [B, K, C, H, W]
        return torch.einsum("bk,bkchw->bchw", resp, per_component)

    denoise = __call__

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0, cond: Tensor | None = None) -> Tensor:
        """log p_sigma(x) per sample, [B]."""
        self._check_x(x)
        var = self._noisy_var(torch.as_tensor(sigma), x)
        diff2 = (x[:, None] - self.means.to(x.dtype)[None]) ** 2
        log_norm = -0.5 * (diff2 / var + torch.log(2 * math.pi * var)).flatten(2).sum(-1)
        return torch.logsumexp(self._component_log_weights(cond, x.shape[0], x) + log_norm, dim=1)

    # ---- exact sampling and moments ----------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """n exact samples of the data distribution x0 (class-conditional when cond is given)."""
        like = self.means
        log_w = self._component_log_weights(cond, n, like)
        comp = torch.multinomial(log_w.exp().cpu(), 1, generator=generator).squeeze(1).to(like.device)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=like.dtype).to(like.device)
        return self.means[comp] + self.stds[comp] * eps

    def _moment_weights(self, cond: int | None) -> Tensor:
        log_w = self._component_log_weights(None if cond is None else torch.tensor([cond]), 1, self.means)
        return log_w[0].exp().double()

    def mean(self, cond: int | None = None) -> Tensor:
        """Exact mean of the data distribution, flattened [d], float64."""
        w = self._moment_weights(cond)
        return (w[:, None] * self.means.flatten(1).double()).sum(0)

    def covariance(self, cond: int | None = None) -> Tensor:
        """Exact covariance sum_k pi_k (S_k + mu_k mu_k^T) - m m^T, flattened [d, d], float64."""
        w = self._moment_weights(cond)
        mu = self.means.flatten(1).double()
        m = (w[:, None] * mu).sum(0)
        second = torch.einsum("k,ki,kj->ij", w, mu, mu) + torch.diag((w[:, None] * self.stds.flatten(1).double() ** 2).sum(0))
        return second - torch.outer(m, m)

    def __repr__(self) -> str:
        return f"GaussianMixture(shape={self.shape}, components={self.n_components}, classes={self.n_classes}, dtype={self.dtype})"


def _pattern_bank(shape: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Structured "image" patterns in [-1, 1]: gradients, stripes, checkers, a disk, a ring, a cross."""
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    freq = 1 + int(torch.randint(1, 3, (1,), generator=generator))
    grey = [
        xx,
        yy,
        torch.sign(torch.sin(math.pi * freq * xx)),
        torch.sign(torch.sin(math.pi * freq * xx) * torch.sin(math.pi * freq * yy)),
        torch.where(r < 0.6, 1.0, -1.0).double(),
        torch.where((r > 0.45) & (r < 0.85), 1.0, -1.0).double(),
        torch.where((xx.abs() < 0.25) | (yy.abs() < 0.25), 1.0, -1.0).double(),
        torch.cos(math.pi * r * freq),
    ]
    return grey


def default_gmm(
    seed: int = 0,
    shape: Sequence[int] = (3, 8, 8),
    n_components: int = 8,
    n_classes: int = 4,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> GaussianMixture:
    """The embedded default model: structured image-like means, per-pixel stds, from a seed.

    Each component mean is a spatial pattern (gradient, stripes, checkerboard, disk, ring, cross, ...)
    tinted with a random colour and scaled into [-0.8, 0.8]; per-pixel standard deviations lie in
    [0.05, 0.3]; weights are random but bounded away from zero; component k belongs to class k % n_classes.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    if n_components < 1 or not 0 <= n_classes <= n_components:
        raise ValueError(f"need n_components >= 1 and 0 <= n_classes <= n_components, got {n_components}, {n_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    c, h, w = (int(s) for s in shape)
    bank = _pattern_bank((c, h, w), gen)
    means = torch.empty((n_components, c, h, w), dtype=torch.float64)
    for k in range(n_components):
        pattern = bank[k % len(bank)] * (1 if k < len(bank) else -1)
        tint = torch.rand((c, 1, 1), generator=gen, dtype=torch.float64) * 0.8 + 0.2
        offset = (torch.rand((c, 1, 1), generator=gen, dtype=torch.float64) - 0.5) * 0.4
        means[k] = (0.6 * tint * pattern[None] + offset).clamp(-0.8, 0.8)
    stds = 0.05 + 0.25 * torch.rand((n_components, c, h, w), generator=gen, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_components, generator=gen, dtype=torch.float64)
    classes = torch.arange(n_components) % n_classes if n_classes > 0 else None
    return GaussianMixture(means, stds, weights, classes).to(device=device, dtype=dtype)
