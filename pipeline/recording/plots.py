"""Figures of a study, drawn with matplotlib's object API (no pyplot state): a schedule against its baselines,
learned vs best baseline per NFE, and a grid of sample images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor


def float_list(values: Any) -> list[float]:
    """A tensor or sequence of numbers -> a list of Python floats (float64 first for tensors)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double()
    return [float(v) for v in values]


def plot_schedule(
    sigmas: Any,
    sigmas_eval: Any | None = None,
    *,
    baselines: Mapping[str, Any] | None = None,
    costs: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """log σ against step index i: the learned grid σ_i (and the decoupled σ'_i) against baseline grids
    (labelled with the seconds each took to compute, where ``costs`` has them)."""
    figure = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, grid) in enumerate(sorted((baselines or {}).items())):
        values = float_list(grid)
        cost = "" if name not in (costs or {}) else f" ({costs[name]:.2g} s)"
        axes.plot(range(len(values)), values, color=f"C{index + 2}", lw=1.0, ls=":", marker=".",
                  label=f"baseline: {name}{cost}")
    learned = float_list(sigmas)
    axes.plot(range(len(learned)), learned, color="C0", lw=2.0, marker="o", label="learned σ (solver steps)")
    if sigmas_eval is not None:
        evaluated = float_list(sigmas_eval)
        axes.plot(range(len(evaluated)), evaluated, color="C1", lw=1.5, ls="--", marker="x",
                  label="learned σ_eval (denoiser calls)")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step index i")
    axes.set_ylabel("σ_i (log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper right")
    if title:
        axes.set_title(title, fontsize="medium")
    return figure


def plot_learned_vs_baseline(losses: Mapping[str, Mapping[int, tuple[float, float | None]]]) -> Figure:
    """Validation loss against NFE, one panel per solver: the best baseline (dashed) and the learned schedule
    (solid; missing where no trial finished). ``losses[solver][nfe] = (best baseline, learned or None)``."""
    figure = Figure(figsize=(4.0 * max(1, len(losses)), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    for index, (solver, by_nfe) in enumerate(losses.items()):
        axes = figure.add_subplot(1, len(losses), index + 1)
        nfes = sorted(by_nfe)
        axes.plot(nfes, [by_nfe[n][0] for n in nfes], color="C1", ls="--", marker="s", label="best baseline")
        learned = [(n, by_nfe[n][1]) for n in nfes if by_nfe[n][1] is not None]
        axes.plot([n for n, _ in learned], [v for _, v in learned], color="C0", marker="o", label="learned (LD3)")
        axes.set_yscale("log")
        axes.set_xticks(nfes)
        axes.set_xlabel("NFE")
        axes.set_ylabel("validation loss" if index == 0 else "")
        axes.set_title(solver, fontsize="medium")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def grid_image(images: Tensor, columns: int, *, min_tile: int = 32, pad: int = 2) -> Image.Image:
    """uint8 images [n, 3, h, w] -> one RGB image, ``columns`` per row, small tiles upscaled (nearest)."""
    n, channels, height, width = images.shape
    scale = -(-min_tile // min(height, width))
    tiles = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    tile_h, tile_w = height * scale + pad, width * scale + pad
    rows = -(-n // columns)
    canvas = torch.full((channels, rows * tile_h + pad, columns * tile_w + pad), 255, dtype=torch.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        canvas[:, pad + row * tile_h : (row + 1) * tile_h, pad + col * tile_w : (col + 1) * tile_w] = tile
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())
