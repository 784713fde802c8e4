"""CPU benchmark: learned solver coefficients + time steps vs time steps alone on the project's trained digits
model (issue 17), scored by the classifier FD (an FID analogue, docs/digits.md) as well as by RMSE.

For each solver at NFE 4, LD3 is trained twice on the same teacher pairs with the same recipe (the GMM bench's:
train batch 8, lr1 0.02, lr2 0.5/N, 2 + 5 rounds, L2, decoupled; iPNDM from EDM ρ=7), once with
``learn_coefficients`` and once without. Teacher: UniPC-3 NFE 20 on EDM ρ=7, class-balanced labels.
Training latents: seeds 0 …; validation: 100,000 …; held-out pairs (never trained or selected on): 300,000 …;
FD: ``--sets`` disjoint sets of ``--samples`` class-balanced samples (seeds 3,000,000 …, as
bench/digits_fd_spread.py), mean ± sd over the sets, and the classifier's accuracy on the asked class.

    python bench/digits_coefficients.py --out /tmp/digits_coefficients.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.digits_fd_spread import fd_over_sets
from ld3.digits.data import N_CLASSES
from ld3.digits.denoiser import load_digits_denoiser
from ld3.digits.quality import DigitsQuality
from ld3.discretizations import edm_rho
from ld3.losses import l2_loss
from ld3.sampling import sample, sample_losses
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import atomic_write_bytes, latents_from_seeds

RECIPE = LD3Config(train_batch_size=8, lr1=0.02, lr2_coef=0.5, loss="l2")
SOLVERS = {"ipndm": (3, "edm_rho"), "unipc_bh1": (3, None)}  # order, init_prior


def labels(n: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(n) + offset) % N_CLASSES


def teacher_pairs(denoiser, start: int, n: int) -> TeacherData:
    z, cond = latents_from_seeds(range(start, start + n), denoiser.shape), labels(n, start)
    y = sample(denoiser, "unipc_bh1", 3, edm_rho(20, denoiser.schedule), z, cond=cond, batch_size=500)
    return TeacherData(z, y, cond)


def rmse(denoiser, solver: str, order: int, data: TeacherData, sigmas, sigmas_eval, coefficients) -> float:
    losses = sample_losses(denoiser, solver, order, sigmas, data.z, data.y, l2_loss, sigmas_eval=sigmas_eval,
                           cond=data.cond, batch_size=500, coefficients=coefficients)
    return float(losses.mean().sqrt())


def run(solver: str, coefficients_on: bool, data: dict, denoiser, quality, args) -> dict:
    order, prior = SOLVERS[solver]
    config = replace(RECIPE, learn_coefficients=coefficients_on, init_prior=prior)
    start = time.perf_counter()
    result = train_ld3(denoiser, solver, order, denoiser.schedule, data["train"], data["val"], config, nfe=args.nfe)
    wall = time.perf_counter() - start
    grid = (result.sigmas, result.sigmas_eval, result.coefficients)
    fds, accs = fd_over_sets(denoiser, quality, solver, order, *grid, args.samples, args.sets)
    return {"solver": solver, "coefficients": coefficients_on, "train_wall_s": wall,
            "val": rmse(denoiser, solver, order, data["val"], *grid),
            "held_out": rmse(denoiser, solver, order, data["test"], *grid),
            "fd": fds, "accuracy": accs, "sigmas": result.sigmas.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--pairs", type=int, default=100, help="training pairs, and as many validation pairs")
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--solvers", default="ipndm,unipc_bh1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    denoiser, quality = load_digits_denoiser(), DigitsQuality()
    data = {"train": teacher_pairs(denoiser, 0, args.pairs), "val": teacher_pairs(denoiser, 100_000, args.pairs),
            "test": teacher_pairs(denoiser, 300_000, args.held_out)}
    reports = []
    for solver in args.solvers.split(","):
        for on in (False, True):
            report = run(solver, on, data, denoiser, quality, args)
            reports.append(report)
            print(f"{solver:<10} NFE {args.nfe} coefficients {'on ' if on else 'off'}  val RMSE {report['val']:.4f}  "
                  f"held-out {report['held_out']:.4f}  FD {statistics.mean(report['fd']):.3f} ± "
                  f"{statistics.stdev(report['fd']):.3f}  accuracy {statistics.mean(report['accuracy']):.4f}  "
                  f"(train {report['train_wall_s']:.0f} s)", flush=True)
    if args.out:
        atomic_write_bytes(args.out, json.dumps({"args": vars(args), "reports": reports}, indent=1).encode())


if __name__ == "__main__":
    main()
