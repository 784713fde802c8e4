"""CPU benchmark: learned solver coefficients + time steps vs time steps alone on the exact GMM (issue 17).

For each solver × NFE × seed, LD3 is trained twice on the same teacher pairs with the same recipe
(bench/gmm_quality.py's: train batch 8, lr1 = 0.02, lr2 = 0.5 / N, iPNDM started from EDM ρ=7, order 3),
once with ``learn_coefficients`` (docs/method.md#learned-coefficients) and once without. Seed s draws its own
training latents (seeds 1000·s …) and validation latents (100000 + 1000·s …); every run is scored on the
same held-out pairs (latents 300000 …, never used for training or selection) and the same 2,000 FD latents:

- val: pooled RMSE to the teacher on the original validation latents (the trainer's ``final_val_loss``);
- test: the same on the held-out latents; FD: exact data-space Fréchet distance (``gmm_frechet_distance``).

Prints one row per cell and seed, then the per-cell means of the ratios (with / without coefficients).
Example (one torch thread):

    python bench/gmm_coefficients.py --out /tmp/gmm_coefficients.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gmm_quality import ORDER, PRIOR, RECIPE, SCHEDULE, scores
from bench.train_cpu import teacher_pairs
from ld3.models.gmm import default_gmm
from ld3.train import LD3Config, train_ld3
from ld3.utils import atomic_write_bytes, latents_from_seeds

CELLS = tuple(f"{solver}:{nfe}" for solver in ("ipndm", "unipc_bh1") for nfe in (3, 4, 5, 6))


def seed_data(gmm, seed: int, n_pairs: int) -> dict:
    """Training and validation pairs of one seed (disjoint latents)."""
    pairs = lambda start: teacher_pairs(gmm, SCHEDULE, range(start, start + n_pairs), torch.float64)  # noqa: E731
    return {"train": pairs(1000 * seed), "val": pairs(100_000 + 1000 * seed)}


def train_and_score(gmm, solver: str, nfe: int, data: dict, config: LD3Config) -> dict:
    start = time.perf_counter()
    result = train_ld3(gmm, solver, ORDER, SCHEDULE, data["train"], data["val"], config, nfe=nfe)
    wall = time.perf_counter() - start
    report = scores(gmm, solver, data, result.sigmas, result.sigmas_eval, result.coefficients)
    assert abs(report["val"] - result.final_val_loss**0.5) < 1e-9 * max(1.0, report["val"])  # scored as trained
    return {**report, "wall_s": wall, "steps": result.steps, "sigmas": result.sigmas.tolist(),
            "coefficients": None if result.coefficients is None else result.coefficients.tolist()}


def run_cell(gmm, cell: str, seed: int, data: dict, lr_coef: float) -> dict:
    solver, nfe = cell.split(":")[0], int(cell.split(":")[1])
    config = replace(RECIPE, init_prior=PRIOR[solver], seed=seed)
    plain = train_and_score(gmm, solver, nfe, data, config)
    learned = train_and_score(gmm, solver, nfe, data, replace(config, learn_coefficients=True, lr_coef=lr_coef))
    ratios = {key: learned[key] / plain[key] for key in ("val", "test", "fd")}
    print(f"{solver} NFE {nfe} seed {seed}: val {plain['val']:.4f} -> {learned['val']:.4f} ({ratios['val']:.2f}), "
          f"test {plain['test']:.4f} -> {learned['test']:.4f} ({ratios['test']:.2f}), "
          f"FD {plain['fd']:.3f} -> {learned['fd']:.3f} ({plain['wall_s'] + learned['wall_s']:.0f} s)", flush=True)
    return {"solver": solver, "nfe": nfe, "seed": seed, "steps_only": plain, "with_coefficients": learned,
            "ratios": ratios}


def table(reports: list[dict]) -> str:
    lines = ["| solver | NFE | seed | val RMSE steps / +coef | ratio | held-out RMSE steps / +coef | ratio "
             "| FD steps / +coef |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        a, b = r["steps_only"], r["with_coefficients"]
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['seed']} | {a['val']:.4f} / {b['val']:.4f} | "
                     f"{r['ratios']['val']:.2f} | {a['test']:.4f} / {b['test']:.4f} | {r['ratios']['test']:.2f} | "
                     f"{a['fd']:.3f} / {b['fd']:.3f} |")
    lines += ["", "| solver | NFE | mean val ratio | mean held-out ratio | mean FD ratio |", "|---|---|---|---|---|"]
    for cell in dict.fromkeys((r["solver"], r["nfe"]) for r in reports):
        rows = [r["ratios"] for r in reports if (r["solver"], r["nfe"]) == cell]
        means = [statistics.mean(row[key] for row in rows) for key in ("val", "test", "fd")]
        lines.append(f"| {cell[0]} | {cell[1]} | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated solver:nfe (default: iPNDM and "
                        "UniPC-bh1 at NFE 3-6)")
    parser.add_argument("--seeds", type=int, default=2,
                        help="seeds 0 .. K-1 (training/validation latents, batch order)")
    parser.add_argument("--pairs", type=int, default=200, help="training pairs and validation pairs per seed")
    parser.add_argument("--held-out", type=int, default=500, help="held-out pairs for the test RMSE")
    parser.add_argument("--lr-coef", type=float, default=LD3Config.lr_coef)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gmm = default_gmm()
    shared = {"test": teacher_pairs(gmm, SCHEDULE, range(300_000, 300_000 + args.held_out), torch.float64),
              "fd_latents": latents_from_seeds(range(200_000, 202_000), gmm.shape, torch.float64)}
    reports = [run_cell(gmm, cell, seed, {**seed_data(gmm, seed, args.pairs), **shared}, args.lr_coef)
               for seed in range(args.seeds) for cell in args.cells.split(",")]
    print(table(reports))
    if args.out:
        report = {"cells": reports, "recipe": asdict(replace(RECIPE, lr_coef=args.lr_coef)),
                  "date": datetime.date.today().isoformat(),
                  "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                  "machine": {"python": platform.python_version(), "torch": torch.__version__}}
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
