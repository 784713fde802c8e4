"""CPU benchmark: wall time of the LD3 reference recipe on the embedded GMM.

Recipe (docs/method.md): 50 training + 50 validation teacher pairs, train batch 2, 2 + 5 rounds, slack radius
0.001·C·H·W/N², decoupled timesteps in lambda mode, L2 loss; student UniPC-3 (bh1) at NFE 10;
teacher UniPC-3 at NFE 20 on the EDM ρ=7 grid; default GMM 3×8×8 in float64. Teacher generation is
not timed. Each recipe runs ``--repeats`` times (one torch thread unless ``--threads``); the table
shows the minimum and median wall time, training steps, denoiser calls and the validation RMSE of
the learned schedule next to the best baseline grid. Prints a Markdown table; ``--out`` also writes
JSON. Example:

    python bench/train_cpu.py --out /tmp/train_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict

import torch

from ld3.discretizations import BASELINES, edm_rho
from ld3.losses import l2_loss
from ld3.models.gmm import default_gmm
from ld3.sampling import sample, schedule_loss
from ld3.schedules import EDMSchedule
from ld3.solvers import solver_steps_for_nfe
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import atomic_write_bytes, latents_from_seeds


class CountingDenoiser:
    """Counts denoiser calls (batched calls, and samples × calls)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.sample_calls = denoiser, 0, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.sample_calls += x.shape[0]
        return self.denoiser(x, sigma, cond)


def teacher_pairs(gmm, schedule, seeds, dtype) -> TeacherData:
    z = latents_from_seeds(seeds, gmm.shape, dtype)
    return TeacherData(z, sample(gmm, "unipc_bh1", 3, edm_rho(20, schedule), z))


def val_rmse(gmm, solver, order, val, sigmas, sigmas_eval=None) -> float:
    return schedule_loss(gmm, solver, order, sigmas, val.z, val.y, l2_loss, sigmas_eval=sigmas_eval) ** 0.5


def bench(args, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    gmm, schedule = default_gmm(dtype=dtype), EDMSchedule()
    train = teacher_pairs(gmm, schedule, range(args.n_train), dtype)
    val = teacher_pairs(gmm, schedule, range(100_000, 100_000 + args.n_val), dtype)
    config = LD3Config(train_batch_size=args.batch_size, rounds_v1=args.rounds[0], rounds_v2=args.rounds[1])
    n_steps = solver_steps_for_nfe(args.solver, args.nfe)
    baselines = {name: val_rmse(gmm, args.solver, args.order, val, grid(n_steps, schedule))
                 for name, grid in BASELINES.items()}
    walls, result, counter = [], None, None
    for _ in range(args.repeats):
        counter = CountingDenoiser(gmm)
        start = time.perf_counter()
        result = train_ld3(counter, args.solver, args.order, schedule, train, val, config, nfe=args.nfe)
        walls.append(time.perf_counter() - start)
    learned = val_rmse(gmm, args.solver, args.order, val, result.sigmas, result.sigmas_eval)
    return {
        "recipe": {"solver": args.solver, "order": args.order, "nfe": args.nfe, "n_train": args.n_train,
                   "n_val": args.n_val, "dtype": dtype_name, "threads": torch.get_num_threads(), "config": asdict(config)},
        "wall_s": walls, "wall_min_s": min(walls), "wall_median_s": statistics.median(walls),
        "steps": result.steps, "stop_reason": result.stop_reason,
        "denoiser_calls": counter.calls, "denoiser_sample_calls": counter.sample_calls,
        "ms_per_step": 1000 * min(walls) / result.steps,
        "val_rmse_learned": learned, "val_rmse_baselines": baselines,
        "sigmas": result.sigmas.tolist(), "sigmas_eval": result.sigmas_eval.tolist(),
        "load_avg_1min": os.getloadavg()[0],
    }


def row(report: dict) -> str:
    recipe = report["recipe"]
    best_name = min(report["val_rmse_baselines"], key=report["val_rmse_baselines"].get)
    return (
        f"| {recipe['solver']}-{recipe['order']}, NFE {recipe['nfe']}, {recipe['n_train']}+{recipe['n_val']}, "
        f"batch {recipe['config']['train_batch_size']}, {recipe['config']['rounds_v1']}+{recipe['config']['rounds_v2']} rounds, "
        f"{recipe['dtype']}, {recipe['threads']} thread(s) | {report['steps']} | {report['wall_min_s']:.2f} / "
        f"{report['wall_median_s']:.2f} | {report['ms_per_step']:.1f} | {report['denoiser_calls']:,} / "
        f"{report['denoiser_sample_calls']:,} | {report['val_rmse_learned']:.4f} | "
        f"{report['val_rmse_baselines'][best_name]:.4f} ({best_name}) |"
    )


HEADER = ("| recipe | steps | wall s (min / median) | ms / step | denoiser calls (batched / per sample) "
          "| val RMSE learned | best baseline |\n|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", default="unipc_bh1")
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, nargs=2, default=(2, 5), metavar=("V1", "V2"))
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=("float64", "float32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [bench(args, name) for name in args.dtypes]
    report = {
        "runs": runs, "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
    }
    print("\n".join([HEADER, *map(row, runs)]))
    print("load average (1 min) after each run: " + ", ".join(f"{r['load_avg_1min']:.1f}" for r in runs))
    if args.out:
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
