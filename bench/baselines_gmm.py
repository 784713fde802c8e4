"""CPU benchmark: every baseline schedule (the four fixed grids, DMN, GITS) on the exact GMM (issue 18).

For each solver × NFE: the pooled RMSE of the schedule's solve against the teacher (UniPC-3, NFE 20, EDM ρ=7:
bench/train_cpu.py's teacher_pairs) on held-out latents, and the wall time the schedule took to compute.
GITS is computed from the trajectories of separate latents (seeds 0 .. --gits-samples - 1), with the reference's
defaults (cost metric "dev", coeff 1.15, 60 fine iPNDM-4 steps on EDM ρ=7) and also with the plain "l2" cost; AYS has no published list for this model (none is made).

    python bench/baselines_gmm.py --out /tmp/baselines_gmm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.train_cpu import teacher_pairs, val_rmse
from ld3.baselines import GITSConfig, cell_baselines, gits
from ld3.models.gmm import default_gmm
from ld3.schedules import EDMSchedule
from ld3.solvers import solver_steps_for_nfe
from ld3.utils import atomic_write_bytes, latents_from_seeds

SOLVERS = (("unipc_bh1", 3), ("ipndm", 4), ("dpmpp", 2))
VAL_SEED_OFFSET = 100_000


def cell(gmm, schedule, solver: str, order: int, nfe: int, val, gits_z) -> dict[str, dict[str, float]]:
    """RMSE to the teacher and compute time of every baseline of one cell (GITS also with the l2 cost)."""
    n_steps = solver_steps_for_nfe(solver, nfe)
    timed = cell_baselines(n_steps, schedule, gmm, gits_z, gits_config=GITSConfig(num_samples=gits_z.shape[0]))
    started = time.perf_counter()
    gits_l2 = gits(gmm, n_steps, schedule, gits_z, config=GITSConfig(metric="l2", num_samples=gits_z.shape[0]))
    grids = {name: (grid.sigmas, grid.cost_s) for name, grid in timed.items()}
    grids["gits_l2"] = (gits_l2, time.perf_counter() - started)
    return {name: {"rmse": val_rmse(gmm, solver, order, val, sigmas), "cost_s": cost, "sigmas": sigmas.tolist()}
            for name, (sigmas, cost) in grids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfes", default="4,5,6")
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--gits-samples", type=int, default=GITSConfig().num_samples)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm, schedule = default_gmm(dtype=torch.float64), EDMSchedule()
    val = teacher_pairs(gmm, schedule, range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + args.n_val), torch.float64)
    gits_z = latents_from_seeds(range(args.gits_samples), gmm.shape, torch.float64)
    results = {}
    for solver, order in SOLVERS:
        for nfe in (int(n) for n in args.nfes.split(",")):
            rows = cell(gmm, schedule, solver, order, nfe, val, gits_z)
            results[f"{solver}-o{order}/nfe{nfe}"] = rows
            line = "  ".join(f"{name} {row['rmse']:.4f} ({row['cost_s']:.2f}s)" for name, row in rows.items())
            print(f"{solver}-o{order} NFE {nfe}: {line}", flush=True)
    if args.out is not None:
        atomic_write_bytes(args.out, json.dumps(results, indent=1).encode())


if __name__ == "__main__":
    main()
