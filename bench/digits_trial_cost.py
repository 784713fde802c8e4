"""CPU seconds of LD3 training rounds on the digits model, with the validation solves batched or not.

    python bench/digits_trial_cost.py [--rounds 3]

The study's setting (studies/digits.py): iPNDM-4 at NFE 4, 50 training + 50 validation pairs of the UniPC-3
NFE-20 teacher (seeds 0-99, the study's class ids), train batch 2, decoupled, lambda mode. Trains the same
rounds twice on one torch thread: with the reference's validation slack pass in batches of the train batch
and the checks' solves in batches of 25, then with both in one batch of 50 (``val_slack_batch_size``,
``val_solve_batch_size``), and prints each run's CPU seconds, validation loss and grid: the same steps, so the
same schedule, at a lower cost.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from ld3.baselines import named_grid
from ld3.digits.data import N_CLASSES
from ld3.digits.denoiser import load_digits_denoiser
from ld3.sampling import sample
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import latents_from_seeds
from pipeline.model_studies import balanced_class_ids

# the hyperparameters of the study's best iPNDM trial (its first: Optuna's seeded TPE)
RECIPE = LD3Config(loss="l2", rounds_v1=1, rounds_v2=2, train_batch_size=2, lr1=0.0114, lr2=0.0176,
                   slack_coef=0.00125, win_rate=0.358)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="1 phase-1 round, the rest phase 2")
    args = p.parse_args()
    torch.set_num_threads(1)
    denoiser = load_digits_denoiser()
    z = latents_from_seeds(range(100), denoiser.shape)
    labels = torch.tensor(balanced_class_ids(100, N_CLASSES, 0))
    y = sample(denoiser, "unipc_bh1", 3, named_grid("edm_rho", 20, denoiser.schedule), z, cond=labels, batch_size=100)
    train, val = TeacherData(z[:50], y[:50], labels[:50]), TeacherData(z[50:], y[50:], labels[50:])
    base = replace(RECIPE, rounds_v2=args.rounds - 1)
    for name, config in (("reference batches", base),
                         ("one batch of 50", replace(base, val_slack_batch_size=50, val_solve_batch_size=50))):
        started = time.process_time()
        result = train_ld3(denoiser, "ipndm", 4, denoiser.schedule, train, val, config, n_steps=4)
        print(f"{name:<18} {time.process_time() - started:6.1f} CPU s  {result.steps} steps  "
              f"val loss {result.final_val_loss:.6e}  σ {[round(float(s), 5) for s in result.sigmas]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
