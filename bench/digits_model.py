"""The shipped digits model, measured: teacher quality against the data's own floor, and NFE-4 baselines.

    python bench/digits_model.py [--weights DIR] [--device cuda] [--samples 2000] [--json out.json] [--grid g.png]

Numbers (bench/RESULTS.md, "Digits model"): the classifier's held-out accuracy; the floor (classifier
Fréchet distance of the 360 held-out images to the training split); for the teacher solve (UniPC-3,
NFE 20, EDM ρ=7: the digits study's teacher) and a finer one (Heun, 50 steps, NFE 100), unconditional, class-
conditional and guided: FD of ``--samples`` samples and the classifier's accuracy on the asked class;
the FD's seed-to-seed spread (5 disjoint seed sets); and the FD of every baseline grid at NFE 4 for
UniPC-3 and iPNDM-4, the cells the digits study learns. ``--weights DIR`` takes retrained files
(``python -m ld3.digits.train --out DIR``); without it, the shipped ones (digest-checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ld3.digits.data import N_CLASSES, load_split
from ld3.digits.denoiser import load_digits_denoiser
from ld3.digits.quality import DigitsQuality
from ld3.digits.shipped import CLASSIFIER_FILE, DENOISER_FILE
from ld3.discretizations import BASELINES, get_baseline
from ld3.sampling import sample
from ld3.solvers import solver_steps_for_nfe
from ld3.utils import latents_from_seeds

TEACHERS = {"unipc_bh1-o3-nfe20": ("unipc_bh1", 3, 20), "heun-nfe100": ("heun", 2, 100)}
STUDY_CELLS = (("unipc_bh1", 3), ("ipndm", 4))
GUIDANCE = 2.0


def draw(denoiser, solver: str, order: int, nfe: int, seeds: range, labels: torch.Tensor | None, device, grid: str = "edm_rho"):
    n_steps = solver_steps_for_nfe(solver, nfe)
    sigmas = get_baseline(grid)(n_steps, denoiser.schedule).to(device)
    z = latents_from_seeds(seeds, denoiser.shape, torch.float32, device)
    return sample(denoiser, solver, order, sigmas, z, cond=labels, batch_size=1000).cpu()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--data", default=None, help="an .npz copy of the digits; default: scikit-learn")
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default=None, help="PNG: 10 samples per class (teacher, conditional) above 10 held-out images per class")
    args = p.parse_args()
    device = torch.device(args.device)
    weights = Path(args.weights) if args.weights else None
    quality = DigitsQuality(weights / CLASSIFIER_FILE if weights else None, device=device, data_source=args.data)
    variants = {
        "unconditional": load_digits_denoiser(weights / DENOISER_FILE if weights else None, conditional=False, device=device),
        "conditional": load_digits_denoiser(weights / DENOISER_FILE if weights else None, device=device),
        f"guided-w{GUIDANCE:g}": load_digits_denoiser(weights / DENOISER_FILE if weights else None, guidance_scale=GUIDANCE, device=device),
    }
    n = args.samples
    labels = (torch.arange(n) % N_CLASSES).to(device)
    x_held, y_held = load_split("heldout", args.data)
    out: dict = {"samples": n, "device": str(device), "classifier_heldout_accuracy": quality.accuracy(x_held, y_held),
                 "floor_heldout_vs_train": quality.floor(), "teachers": {}, "nfe4": {}}
    start = time.perf_counter()
    for name, denoiser in variants.items():
        cond = None if denoiser.condition_kind is None else labels
        for teacher, (solver, order, nfe) in TEACHERS.items():
            x = draw(denoiser, solver, order, nfe, range(10**6, 10**6 + n), cond, device)
            row = {"fd": quality.frechet_distance(x)}
            if cond is not None:
                row["accuracy"] = quality.accuracy(x, cond.cpu())
            out["teachers"][f"{name}/{teacher}"] = row
    solver, order, nfe = TEACHERS["unipc_bh1-o3-nfe20"]
    spread = [quality.frechet_distance(draw(variants["conditional"], solver, order, nfe, range(s * n, (s + 1) * n), labels, device))
              for s in range(2, 7)]
    out["teacher_conditional_fd_seed_sets"] = spread
    out["teacher_conditional_fd_sd"] = statistics.stdev(spread)
    for solver, order in STUDY_CELLS:
        for name in BASELINES:
            x = draw(variants["conditional"], solver, order, 4, range(10**6, 10**6 + n), labels, device, grid=name)
            out["nfe4"][f"{solver}-o{order}/{name}"] = {"fd": quality.frechet_distance(x), "accuracy": quality.accuracy(x, labels.cpu())}
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.grid:
        from torchvision.utils import save_image

        per_class = torch.arange(100) // 10
        x = draw(variants["conditional"], "unipc_bh1", 3, 20, range(10**6, 10**6 + 100), per_class.to(device), device)
        real = torch.cat([x_held[y_held == c][:10] for c in range(N_CLASSES)])
        both = torch.cat([x.reshape(10, 10, 1, 8, 8).transpose(0, 1).reshape(100, 1, 8, 8), real.reshape(10, 10, 1, 8, 8).transpose(0, 1).reshape(100, 1, 8, 8)])
        big = both.clamp(-1, 1).add(1).div(2).repeat_interleave(4, 2).repeat_interleave(4, 3)
        save_image(big, args.grid, nrow=10, padding=2, pad_value=1.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
