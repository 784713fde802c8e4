"""Classifier FD of a digits study's schedules on several disjoint seed sets: is the learned one's lead larger
than the spread?

    python bench/digits_fd_spread.py --export exports/digits/digits-cond__ipndm-o4__nfe4.json \
        --schedule-json <a trial run's schedule.json artifact> [--samples 10000] [--sets 3] [--baselines gits,dmn] \
    [--teacher]

Solves ``--samples`` class-balanced samples per seed set (seeds 3,000,000 + k·samples …, disjoint from the
teacher's, the study's and the evaluation stage's) with the export's solver on the learned grid and on the
baseline grids the study logged (the ``baselines`` of a run's ``schedule.json``; ``--baselines`` picks some),
and prints mean ± sd of the classifier FD and the accuracy per schedule (``--teacher``: also the study's teacher,
UniPC-3 at NFE 20 on EDM ρ=7, for scale). Every schedule sees the same latents,
so the last lines also give the learned schedule's paired lead over each baseline (mean ± sd over the sets)
and whether its lead over the best baseline exceeds the seed-to-seed spread (the larger of the two sds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ld3.baselines import named_grid
from ld3.digits.data import N_CLASSES
from ld3.digits.denoiser import load_digits_denoiser
from ld3.digits.quality import DigitsQuality
from ld3.sampling import sample
from ld3.utils import latents_from_seeds
from pipeline.recording.exports import ExportedSchedule, load_schedule

SEED_BASE = 3_000_000
TEACHER = "teacher (NFE 20)"  # not a baseline: left out of the leads


def grids_to_score(exported: ExportedSchedule, schedule_json: str,
                   names: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The learned grid (σ, σ_eval) of the export (sampled with its learned coefficients, if it has them) and the
    chosen baselines of the run's ``schedule.json``."""
    with open(schedule_json) as f:
        baselines = json.load(f)["baselines"]
    chosen = list(baselines) if names is None else names.split(",")
    unknown = sorted(set(chosen) - set(baselines))
    if unknown:
        raise SystemExit(f"--baselines: {unknown} not in {schedule_json} (it has {sorted(baselines)})")
    return {"learned": (exported.sigmas, exported.sigmas_eval),
            **{name: (torch.tensor(baselines[name], dtype=torch.float64), None) for name in chosen}}


def fd_over_sets(denoiser, quality: DigitsQuality, solver: str, order: int, sigmas: torch.Tensor,
                 sigmas_eval: torch.Tensor | None, coefficients: torch.Tensor | None, samples: int,
                 sets: int) -> tuple[list[float], list[float]]:
    """Classifier FD and accuracy of ``sets`` disjoint sets of ``samples`` class-balanced samples (latent seeds
    SEED_BASE + k·samples …, the same for every schedule) -> (FDs, accuracies), one per set."""
    labels = torch.arange(samples) % N_CLASSES
    fds, accs = [], []
    for k in range(sets):
        seeds = range(SEED_BASE + k * samples, SEED_BASE + (k + 1) * samples)
        x = sample(denoiser, solver, order, sigmas, latents_from_seeds(seeds, denoiser.shape),
                   sigmas_eval=sigmas_eval, cond=labels, batch_size=500, coefficients=coefficients)
        fds.append(quality.frechet_distance(x))
        accs.append(quality.accuracy(x, labels))
    return fds, accs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True)
    p.add_argument("--schedule-json", required=True)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--baselines", default=None, help="comma-separated baseline names (default: all the run logged)")
    p.add_argument("--teacher", action="store_true", help="also score the study's teacher (UniPC-3, NFE 20), for scale")
    args = p.parse_args()
    if args.sets < 2:
        raise SystemExit("--sets must be at least 2 (the spread is a standard deviation over the sets)")
    torch.set_num_threads(1)
    exported = load_schedule(args.export)
    grids = grids_to_score(exported, args.schedule_json, args.baselines)
    denoiser, quality = load_digits_denoiser(), DigitsQuality()
    solvers = {name: (exported.solver, exported.order) for name in grids}
    if args.teacher:
        grids[TEACHER] = (named_grid("edm_rho", 20, denoiser.schedule), None)
        solvers[TEACHER] = ("unipc_bh1", 3)
    print(f"{exported.solver}-o{exported.order} NFE {exported.nfe}, {args.samples} samples x {args.sets} seed sets")
    fds: dict[str, list[float]] = {}
    for name, (sigmas, sigmas_eval) in grids.items():
        started = time.process_time()
        fds[name], accs = fd_over_sets(denoiser, quality, *solvers[name], sigmas, sigmas_eval,
                                       exported.coefficients if name == "learned" else None, args.samples, args.sets)
        print(f"{name:<16} FD {statistics.mean(fds[name]):7.3f} ± {statistics.stdev(fds[name]):.3f}   "
              f"accuracy {statistics.mean(accs):.4f}   ({', '.join(f'{v:.3f}' for v in fds[name])})   "
              f"{time.process_time() - started:.0f} CPU s", flush=True)
    print_leads(fds)
    return 0


def print_leads(fds: dict[str, list[float]]) -> None:
    """The learned schedule's paired lead over each baseline, and the verdict against the best baseline."""
    learned = fds["learned"]
    for name, values in fds.items():
        if name not in ("learned", TEACHER):
            leads = [b - a for a, b in zip(learned, values, strict=True)]
            print(f"lead over {name:<16} {statistics.mean(leads):7.3f} ± {statistics.stdev(leads):.3f} (paired)")
    baselines = {name: values for name, values in fds.items() if name not in ("learned", TEACHER)}
    if baselines:
        best = min(baselines, key=lambda name: statistics.mean(baselines[name]))
        margin = statistics.mean(baselines[best]) - statistics.mean(learned)
        spread = max(statistics.stdev(baselines[best]), statistics.stdev(learned))
        print(f"best baseline {best}: margin {margin:.3f}, spread (larger sd) {spread:.3f}: "
              f"{'margin > spread' if margin > spread else 'margin NOT larger than the spread'}")


if __name__ == "__main__":
    raise SystemExit(main())
