"""Small shared helpers: per-sample seeded latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def latents_from_seeds(
    seeds: Sequence[int] | Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard-normal latents ``z`` of shape [len(seeds), *shape], one generator per seed.

    Sample i depends only on ``seeds[i]``, so results never depend on how samples are split into
    batches or workers (DESIGN.md, "Randomness per sample"). Drawn in float64 on the CPU, then cast,
    so the same seed gives the same latent on every device and dtype.
    """
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {min(seeds)}")
    shape = tuple(int(d) for d in shape)
    out = torch.empty((len(seeds), *shape), dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for i, seed in enumerate(seeds):
        gen.manual_seed(seed)
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.to(dtype=dtype, device=device)
