"""Parity with the LD3 reference recipe: our trainer's settings side by side, RMSE over several seeds.

Issue 20: on the reference's own workload (the DDPM-CIFAR-10 UNet architecture with random weights, EDM
preconditioning, 3x32x32) our schedule's validation RMSE was 4% above the reference's. This script runs
the reference recipe (50 + 50 teacher pairs, train batch 2, 2 + 5 rounds, UniPC-3 bh1 at NFE 10, lambda
mode, decoupled, L2; teacher UniPC-3 NFE 20 on EDM rho=7) with each trainer variant below for several
seeds (the seed orders the training batches) and prints the mean, min and max final validation RMSE
(sqrt of the mean per-sample MSE of the best schedule on the original validation latents).

Workloads:

- ``unet``: a small random diffusers ``UNet2DModel`` (the DDPM-CIFAR-10 block layout, attention at the
  second level, narrower and one layer per block) behind EDM preconditioning (sigma_data 0.5,
  c_noise = log(sigma)/4), 3 x size x size; ``--full`` gives the issue's full-size network at 3x32x32;
- ``gmm``: the embedded exact Gaussian mixture (3x8x8).

    python bench/parity_cpu.py --workload unet --seeds 0 1 2 --out /tmp/parity_unet.json
    python bench/parity_cpu.py --workload gmm --seeds 0 1 2
    python bench/parity_cpu.py --workload unet --full --device cuda --variants defaults accept_after_step --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ld3.discretizations import LearnableDiscretization, edm_rho, logsnr_uniform
from ld3.losses import l2_loss
from ld3.models.gmm import default_gmm
from ld3.sampling import sample, schedule_loss
from ld3.schedules import EDMSchedule
from ld3.solvers import unipc
from ld3.train import LD3Config, TeacherData, _Trial, train_ld3
from ld3.utils import atomic_write_bytes, latents_from_seeds

# Trainer variants: LD3Config overrides on top of the defaults, and reference behaviours that are not options of
# ours, patched in for the run only (``variant``).
VARIANTS = {
    "defaults": {},
    "whole_set_checks": {"val_batch_size": 50},  # the reference's pixel configs: valid batch 150 >= 50 samples
    "accept_after_step": {"accept_after_step": True},  # the reference's accept-if-better rule
    "reference_rules": {"val_batch_size": 50, "accept_after_step": True},
    "reference_unipc_gradient": {},  # + patch: UniPC's rho without the gradient of r_k (its torch.tensor(list))
    "reload_val_latents": {},  # + patch: a patience reload also restores the validation slack latents of the best
    "reference_window": {},  # + patch: lambda mode's decoupling window from the raw parameters xi
    "reference_all": {"val_batch_size": 50, "accept_after_step": True},  # + all three patches
}
PATCHES = {"reference_unipc_gradient": ("unipc_gradient",), "reload_val_latents": ("reload_val_latents",),
           "reference_window": ("window",), "reference_all": ("unipc_gradient", "reload_val_latents", "window")}


@contextlib.contextmanager
def variant(name: str) -> Iterator[dict]:
    """The variant's LD3Config overrides, with its patches applied for the duration (bench only; not options)."""
    with contextlib.ExitStack() as stack:
        for patch in PATCHES.get(name, ()):
            stack.enter_context(_PATCHERS[patch]())
        yield VARIANTS[name]


@contextlib.contextmanager
def _unipc_reference_gradient() -> Iterator[None]:
    """The reference's UniPC builds its ratios r_k with ``torch.tensor(list)``, which cuts the gradient of the
    predictor/corrector weights rho with respect to r_k (the divisions by r_k keep theirs): solve the Vandermonde
    systems on detached nodes."""
    original = unipc.solve_vandermonde
    unipc.solve_vandermonde = lambda nodes, rhs: original(nodes.detach(), rhs)
    try:
        yield
    finally:
        unipc.solve_vandermonde = original


@contextlib.contextmanager
def _reload_restores_val_latents() -> Iterator[None]:
    """The reference pickles its validation data with every best state and a patience reload restores it; ours
    keeps the current validation slack latents. Save them with the best state, restore them on a patience reload."""
    save, reload = _Trial.save_best, _Trial._reload_best_and_decay

    def save_best(self, *args, **kwargs):
        self.best_z_val = self.z_val.detach().clone()
        return save(self, *args, **kwargs)

    def reload_and_decay(self, *args, **kwargs):
        self.z_val.copy_(self.best_z_val)
        return reload(self, *args, **kwargs)

    _Trial.save_best, _Trial._reload_best_and_decay = save_best, reload_and_decay
    try:
        yield
    finally:
        _Trial.save_best, _Trial._reload_best_and_decay = save, reload


@contextlib.contextmanager
def _reference_window() -> Iterator[None]:
    """In lambda mode the reference's window is ``win_rate * min |xi_{i+1} - xi_i|`` of the raw parameters (zero
    while they are equal, as at its all-ones start), not of the lambda grid as ours (docs/method.md)."""
    original = LearnableDiscretization.eval_window

    def eval_window(self, grid: Tensor) -> Tensor:
        return self.win_rate * self.xi.detach().diff().abs().min() if self.mode == "lambda" else original(self, grid)

    LearnableDiscretization.eval_window = eval_window
    try:
        yield
    finally:
        LearnableDiscretization.eval_window = original


_PATCHERS = {"unipc_gradient": _unipc_reference_gradient, "reload_val_latents": _reload_restores_val_latents,
             "window": _reference_window}
FULL_UNET = {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "norm_num_groups": 32}
SMALL_UNET = {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8}


class EDMPreconditioned(nn.Module):
    """``D(x, σ) = c_skip x + c_out F(c_in x, log(σ)/4)`` (Karras et al. 2022, Table 1, EDM column)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        total = (sigma**2 + self.sigma_data**2).sqrt()
        out = self.net(x / total, (sigma.log() / 4).flatten()).sample
        return self.sigma_data**2 / total**2 * x + sigma * self.sigma_data / total * out


def random_unet(size: int, full: bool) -> EDMPreconditioned:
    """The DDPM-CIFAR-10 UNet layout with random weights after ``torch.manual_seed(0)``."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, **(FULL_UNET if full else SMALL_UNET),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
    return EDMPreconditioned(net.eval().requires_grad_(False))


def workload(args) -> tuple[nn.Module, tuple[int, int, int]]:
    if args.workload == "gmm":
        return default_gmm(dtype=torch.float32, device=args.device), (3, 8, 8)
    size = 32 if args.full else args.size
    return random_unet(size, args.full).to(args.device), (3, size, size)


def teacher_pairs(denoiser, schedule, seeds, shape, device) -> TeacherData:
    """UniPC-3 bh1, NFE 20 on EDM ρ=7, in batches of 20."""
    z = latents_from_seeds(seeds, shape, device=device)
    return TeacherData(z, sample(denoiser, "unipc_bh1", 3, edm_rho(20, schedule).float(), z, batch_size=20))


def rmse(denoiser, val: TeacherData, sigmas: Tensor, sigmas_eval: Tensor | None = None) -> float:
    return schedule_loss(denoiser, "unipc_bh1", 3, sigmas, val.z, val.y, l2_loss, sigmas_eval=sigmas_eval) ** 0.5


def run(args) -> dict:
    denoiser, shape = workload(args)
    schedule = EDMSchedule()
    with torch.no_grad():
        train = teacher_pairs(denoiser, schedule, range(50), shape, args.device)
        val = teacher_pairs(denoiser, schedule, range(100_000, 100_050), shape, args.device)
        baselines = {"logsnr_uniform": rmse(denoiser, val, logsnr_uniform(10, schedule)),
                     "edm_rho": rmse(denoiser, val, edm_rho(10, schedule))}
    extra = {"cuda_graphs": True} if args.device.startswith("cuda") else {}
    results = {}
    for name in args.variants:
        runs = []
        for seed in args.seeds:
            start = time.perf_counter()
            with variant(name) as overrides:
                result = train_ld3(denoiser, "unipc_bh1", 3, schedule, train, val,
                                   LD3Config(seed=seed, **extra, **overrides), nfe=10)
            runs.append({"seed": seed, "rmse": result.final_val_loss**0.5, "steps": result.steps,
                         "stop_reason": result.stop_reason, "wall_s": time.perf_counter() - start})
            print(f"{name} seed {seed}: RMSE {runs[-1]['rmse']:.6f} ({runs[-1]['wall_s']:.0f} s)", flush=True)
        values = [r["rmse"] for r in runs]
        results[name] = {"runs": runs, "mean": statistics.mean(values), "min": min(values), "max": max(values)}
    return {"baselines": baselines, "variants": results}


def table(report: dict) -> str:
    first = next(iter(report["variants"].values()))["mean"]
    lines = ["| variant | RMSE mean | min | max | ÷ first row |", "|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {v['mean']:.6f} | {v['min']:.6f} | {v['max']:.6f} | {v['mean'] / first:.4f} |")
    base = report["baselines"]
    lines.append(f"\nbaselines: logSNR {base['logsnr_uniform']:.5f}, EDM rho=7 {base['edm_rho']:.5f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("unet", "gmm"), default="unet")
    parser.add_argument("--size", type=int, default=8, help="image size of the small UNet")
    parser.add_argument("--full", action="store_true", help="the full DDPM-CIFAR-10 UNet at 3x32x32")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=tuple(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {**run(args), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}}
    print(table(report))
    if args.out:
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
