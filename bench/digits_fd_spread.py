"""Classifier FD of a digits study's schedules on several disjoint seed sets: is the learned one's lead larger
than the spread?

    python bench/digits_fd_spread.py --export exports/digits/digits-cond__ipndm-o4__nfe4.json \
        --schedule-json <a trial run's schedule.json artifact> [--samples 2000] [--sets 3]

Solves ``--samples`` class-balanced samples per seed set (seeds 3,000,000 + k·samples …, disjoint from the
teacher's, the study's and the evaluation stage's) with the export's solver on the learned grid and on every
baseline grid the study logged (the ``baselines`` of a run's ``schedule.json``), and prints mean ± sd of the
classifier FD and the accuracy per schedule.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ld3.digits.data import N_CLASSES
from ld3.digits.denoiser import load_digits_denoiser
from ld3.digits.quality import DigitsQuality
from ld3.sampling import sample
from ld3.utils import latents_from_seeds
from pipeline.recording.exports import load_schedule

SEED_BASE = 3_000_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True)
    p.add_argument("--schedule-json", required=True)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sets", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    exported = load_schedule(args.export)
    grids = {"learned": (exported.sigmas, exported.sigmas_eval)}
    grids |= {name: (torch.tensor(s, dtype=torch.float64), None)
              for name, s in json.load(open(args.schedule_json))["baselines"].items()}
    denoiser, quality = load_digits_denoiser(), DigitsQuality()
    labels = torch.arange(args.samples) % N_CLASSES
    print(f"{exported.solver}-o{exported.order} NFE {exported.nfe}, {args.samples} samples x {args.sets} seed sets")
    for name, (sigmas, sigmas_eval) in grids.items():
        fds, accs = [], []
        for k in range(args.sets):
            seeds = range(SEED_BASE + k * args.samples, SEED_BASE + (k + 1) * args.samples)
            x = sample(denoiser, exported.solver, exported.order, sigmas, latents_from_seeds(seeds, denoiser.shape),
                       sigmas_eval=sigmas_eval, cond=labels, batch_size=500)
            fds.append(quality.frechet_distance(x))
            accs.append(quality.accuracy(x, labels))
        print(f"{name:<16} FD {statistics.mean(fds):7.3f} ± {statistics.stdev(fds):.3f}   "
              f"accuracy {statistics.mean(accs):.4f}   ({', '.join(f'{v:.3f}' for v in fds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
