"""GPU benchmark of ld3 on a network with real cost: floor, teacher, the LD3 recipe end to end, SD-size memory.

The stand-in network is the DDPM CIFAR-10 UNet (diffusers ``UNet2DModel`` with the config of
google/ddpm-cifar10-32, 35.7M parameters, random weights from a fixed seed) wrapped by
``ld3.models.DiffusersDenoiser`` as an EDM denoiser (VP discrete linear schedule, epsilon prediction),
3x32x32. Sections:

1. floor: the network's own forward throughput (samples x NFE per second, no grad) per batch size and
   precision, launched eagerly and replayed from a CUDA graph;
2. teacher: UniPC-3 (bh1), NFE 20, EDM rho=7 grid over the model's sigma range, eager and through
   ``ld3.cuda_graphs.GraphedSolver``, as a fraction of the better floor at the same batch and precision;
3. recipe: the LD3 reference recipe (50 + 50 samples, train batch 2, 2 + 5 rounds, UniPC-3 bh1, NFE 10,
   lambda mode, L2 loss) with ld3's defaults, then faster settings; wall time, s/iteration, peak memory,
   final validation RMSE (sqrt of the mean per-sample MSE of the best schedule on the original
   validation latents), and the fastest setting whose final RMSE is no worse than the defaults';
4. sd: one LD3 training step (UniPC-3 bh2, NFE 10, batch 1, CFG 7.5, L2 on latents) through an SD-1.5-size
   ``UNet2DConditionModel`` (random weights, 4x64x64 latents), with and without gradient checkpointing;
5. workload: issue 20's side-by-side workload: the same UNet architecture (random weights after
   ``torch.manual_seed(0)``) with EDM preconditioning (sigma_data 0.5, c_noise = log(sigma)/4), teacher UniPC-3
   bh1 NFE 20 on EDM's rho=7 grid from latents drawn on the device after ``torch.manual_seed(1)`` in batches
   of 20 (the first 50 train, the next 50 validate), the recipe (2 + 5 rounds, batch 2, UniPC-3 bh1 NFE 10,
   lambda, decoupled, L2) with the fast setting; metric: mean over the validation samples of the per-sample
   RMSE to the teacher on the original latents, learned and for the logSNR / EDM baselines;
6. bundles: trials per hour of ``ld3.train.LD3Bundle`` (K trials, batch orders 0 .. K-1, in one batched
   solve) on the workload for each K of ``--bundle-sizes``, with peak memory and each trial's RMSE;
7. step: where a training step's time goes, per K of ``--bundle-sizes`` on the workload: CUDA-synchronised
   medians of the training solve + backward, the one accept + check solve, the old split for comparison
   (accept re-solve, then check), the whole step (``LD3Bundle._step``), for early and whole-set checks, and the
   validation slack pass of one round; timed through the bundle's own step methods (private, on purpose).

Prints a table per section at the end and writes all numbers to ``<out>/gpu.json``:

    python bench/gpu.py                                  # on CUDA, JSON into $OUT (or --out)
    python bench/gpu.py --device cpu --tiny --out /tmp   # tiny sizes: checks the script on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.parity_cpu import VARIANTS
from bench.parity_cpu import variant as parity_variant
from ld3.cuda_graphs import GraphedSolver
from ld3.digits.denoiser import edm_preconditioning
from ld3.discretizations import LearnableDiscretization, edm_rho, logsnr_uniform
from ld3.losses import l2_loss
from ld3.models import DiffusersDenoiser
from ld3.models.base import DenoiserAdapter
from ld3.sampling import sample
from ld3.schedules import EDMSchedule, VPDiscreteSchedule
from ld3.solvers import unipc_bh1, unipc_bh2
from ld3.train import LD3Bundle, LD3Config, LD3Result, TeacherData, train_ld3
from ld3.utils import atomic_write_bytes, latents_from_seeds

# google/ddpm-cifar10-32, unet/config.json (35.7M parameters; self-attention at the 16x16 level).
DDPM_CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
QUICK_UNET = {**DDPM_CIFAR10_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 32, 32, 32),
              "norm_num_groups": 8}
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}  # the other UNet2DConditionModel defaults are SD v1.x's
QUICK_SD_UNET = {"sample_size": 8, "cross_attention_dim": 32, "block_out_channels": (32, 64, 64, 64),
                 "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 16}

PRECISIONS = ("default", "tf32", "bf16")  # default: PyTorch's (TF32 convolutions, FP32 matmuls)
TEACHER = {"order": 3, "nfe": 20, "rho": 7.0}  # UniPC-3 bh1, NFE 20 = 20 steps, EDM rho=7 grid


# ---- timing and environment ---------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, min_time: float, min_reps: int = 3) -> float:
    """Median wall time of ``fn`` (one warm-up call first; device work synchronised around each call)."""
    fn()
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_time:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_precision(name: str) -> bool:
    """Set PyTorch's TF32 switches for ``name``; return whether the denoiser runs under bf16 autocast."""
    tf32 = name in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default (convolutions in TF32) in every setting
    return name == "bf16"


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict:
    import diffusers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in sys.argv), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return info


# ---- the stand-in network -----------------------------------------------------------------------
def cifar_unet(device: torch.device, quick: bool) -> torch.nn.Module:
    """The DDPM CIFAR-10 UNet architecture with random weights (seed 0), frozen."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(**(QUICK_UNET if quick else DDPM_CIFAR10_UNET))
    return net.to(device).eval().requires_grad_(False)


def cifar_denoiser(net: torch.nn.Module, bf16: bool) -> DiffusersDenoiser:
    """``net`` as an EDM denoiser: DDPM's linear betas (1e-4 .. 0.02, 1000 steps), epsilon prediction."""
    return DiffusersDenoiser(net, VPDiscreteSchedule.linear(), "epsilon", autocast_bf16=bf16)


def graphed_forward(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``fn`` (no arguments, fixed inputs) captured into a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay() -> None:
        graph.replay()

    return replay


def raw_network_call(net: torch.nn.Module, x: Tensor, t: Tensor, bf16: bool) -> Callable[[], Tensor]:
    def call() -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, t).sample

    return call


# ---- 1. floor -----------------------------------------------------------------------------------
@torch.no_grad()
def bench_floor(net: torch.nn.Module, batch_sizes: list[int], device: torch.device, min_time: float) -> list[dict]:
    rows = []
    shape = tuple(net.config.sample_size for _ in range(2))
    for precision in PRECISIONS:
        bf16 = set_precision(precision)
        for batch in batch_sizes:
            x = torch.randn(batch, net.config.in_channels, *shape, device=device)
            t = torch.rand(batch, device=device) * 999
            call = raw_network_call(net, x, t, bf16)
            row = {"precision": precision, "batch": batch,
                   "eager_per_s": batch / median_seconds(call, device, min_time)}
            if device.type == "cuda":
                row["graph_per_s"] = batch / median_seconds(graphed_forward(call), device, min_time)
            row["floor_per_s"] = max(row["eager_per_s"], row.get("graph_per_s", 0.0))
            rows.append(row)
            del x, t, call
    return rows


# ---- 2. teacher ---------------------------------------------------------------------------------
@torch.no_grad()
def bench_teacher(net: torch.nn.Module, batch_sizes: list[int], device: torch.device, min_time: float,
                  floor: list[dict]) -> list[dict]:
    rows = []
    schedule = VPDiscreteSchedule.linear()
    sigmas = edm_rho(TEACHER["nfe"], schedule, rho=TEACHER["rho"]).to(device)
    floors = {(r["precision"], r["batch"]): r["floor_per_s"] for r in floor}  # empty if the floor did not run
    for precision in PRECISIONS:
        denoiser = cifar_denoiser(net, set_precision(precision))
        graphed = GraphedSolver(unipc_bh1)
        for batch in batch_sizes:
            x = sigmas[0].float() * torch.randn(batch, *denoiser.shape, device=device)
            row = {"precision": precision, "batch": batch}
            for name, solver in (("eager", unipc_bh1), ("graph", graphed)):
                solve = lambda: solver(denoiser, x, sigmas, order=TEACHER["order"])  # noqa: B023, E731
                row[f"{name}_per_s"] = batch * TEACHER["nfe"] / median_seconds(solve, device, min_time)
            if device.type == "cuda":
                eager, replayed = unipc_bh1(denoiser, x, sigmas, order=3), graphed(denoiser, x, sigmas, order=3)
                row["graph_vs_eager_max_abs"] = float((eager - replayed).abs().max())
            best = max(row["eager_per_s"], row["graph_per_s"])
            if (precision, batch) in floors:
                row["fraction_of_floor"] = best / floors[(precision, batch)]
            rows.append(row)
        graphed.clear()
    return rows


# ---- 3. the LD3 recipe --------------------------------------------------------------------------
DEFAULTS = "ld3 defaults (reference recipe)"


@dataclass(frozen=True)
class RecipeVariant:
    setting: str
    precision: str = "default"
    overrides: dict = field(default_factory=dict)  # LD3Config fields other than seed
    seed: int = 0  # LD3Config.seed: the order of the training batches

    @property
    def name(self) -> str:
        return f"{self.setting}, seed {self.seed}"


def recipe_variants(device: torch.device, n_val: int, default_seeds: list[int]) -> list[RecipeVariant]:
    """The settings in the order they run; a short --budget skips the exploratory tail.

    The final RMSE of one run depends on the accept-if-better and patience decisions, which rounding
    alone flips, so the fast setting runs over three batch orders (seeds) and settings are compared by
    their mean."""
    graphs = {"cuda_graphs": device.type == "cuda"}
    fast_name = f"cuda_graphs, val_slack_batch_size {n_val}, val_solve_batch_size {n_val}"
    fast = {**graphs, "val_slack_batch_size": n_val, "val_solve_batch_size": n_val}
    return [
        *(RecipeVariant(fast_name, overrides=fast, seed=seed) for seed in range(3)),
        RecipeVariant(f"{fast_name}, TF32", "tf32", fast),
        *(RecipeVariant(DEFAULTS, seed=seed) for seed in default_seeds),
        RecipeVariant("cuda_graphs", overrides=graphs),
        RecipeVariant(f"{fast_name}, bf16", "bf16", fast),
        RecipeVariant(f"{fast_name}, TF32, train batch 5", "tf32", {**fast, "train_batch_size": 5}),
    ]


def summarise_settings(rows: list[dict]) -> list[dict]:
    """Per setting: runs, mean and spread of wall time and final RMSE over its seeds."""
    summary = []
    for setting in dict.fromkeys(r["setting"] for r in rows if "final_val_rmse" in r):
        runs = [r for r in rows if r["setting"] == setting and "final_val_rmse" in r]
        rmse = [r["final_val_rmse"] for r in runs]
        summary.append({"setting": setting, "runs": len(runs),
                        "mean_wall_s": statistics.fmean(r["wall_s"] for r in runs),
                        "mean_final_val_rmse": statistics.fmean(rmse), "min_rmse": min(rmse), "max_rmse": max(rmse)})
    return summary


def teacher_data(net: torch.nn.Module, device: torch.device, n_train: int,
                 n_val: int) -> tuple[TeacherData, TeacherData]:
    """The teacher's pairs (z, y) for seeds 0 .. n_train + n_val - 1, in PyTorch's default precision."""
    denoiser = cifar_denoiser(net, set_precision("default"))
    sigmas = edm_rho(TEACHER["nfe"], denoiser.schedule, rho=TEACHER["rho"]).to(device)
    z = latents_from_seeds(range(n_train + n_val), denoiser.shape, torch.float32, device)
    with torch.no_grad():
        y = torch.cat([unipc_bh1(denoiser, float(sigmas[0]) * part, sigmas, order=TEACHER["order"])
                       for part in z.split(50)])
    return TeacherData(z[:n_train], y[:n_train]), TeacherData(z[n_train:], y[n_train:])


def run_recipe(net: torch.nn.Module, variant: RecipeVariant, train: TeacherData, val: TeacherData,
               device: torch.device, rounds: tuple[int, int]) -> dict:
    denoiser = cifar_denoiser(net, set_precision(variant.precision))
    config = LD3Config(rounds_v1=rounds[0], rounds_v2=rounds[1], loss="l2", mode="lambda", seed=variant.seed,
                       **variant.overrides)
    reset_peak(device)
    synchronize(device)
    step_times: list[tuple[int, float]] = []  # (round, time) after each step's host sync
    start = time.perf_counter()
    result = train_ld3(denoiser, "unipc_bh1", 3, denoiser.schedule, train, val, config, nfe=10,
                       callbacks=[lambda m: step_times.append((m.round, time.perf_counter()))])
    synchronize(device)
    wall = time.perf_counter() - start
    # Steady state: step-to-step intervals inside the rounds after the first (graphs captured, no slack pass).
    intervals = [b[1] - a[1] for a, b in zip(step_times, step_times[1:]) if a[0] == b[0] > 0]
    first_round = max((t for r, t in step_times if r == 0), default=start) - start
    return {"name": variant.name, "setting": variant.setting, "seed": variant.seed, "precision": variant.precision,
            "config": {k: v for k, v in vars(config).items() if not k.startswith("_")},
            "wall_s": wall, "steps": result.steps, "s_per_iteration": wall / max(result.steps, 1),
            "first_round_s": first_round,
            "steady_s_per_iteration": statistics.median(intervals) if intervals else None,
            "peak_gib": peak_gib(device), "final_val_rmse": math.sqrt(result.final_val_loss),
            "best_val_loss": result.best_val_loss, "stop_reason": result.stop_reason,
            "sigmas": result.sigmas.tolist(), "sigmas_eval": result.sigmas_eval.tolist()}


def solve_costs(net: torch.nn.Module, train: TeacherData, val: TeacherData, device: torch.device,
                min_time: float) -> list[dict]:
    """Seconds of the solves one LD3 iteration is made of (default precision), eager and graphed: the
    training solve + backward (batch 2), the accept-if-better re-solve (batch 2), the validation check (all)."""
    denoiser = cifar_denoiser(net, set_precision("default"))
    disc = LearnableDiscretization(10, denoiser.schedule, device=device)

    def solve_loss(solver: Callable[..., Tensor], z: Tensor, y: Tensor) -> Tensor:
        sigmas, sigmas_eval = disc()
        return l2_loss(solver(denoiser, disc.sigma_max * z, sigmas, sigmas_eval, order=3), y).mean()

    def timed(solver: Callable[..., Tensor], z: Tensor, y: Tensor, backward: bool) -> float:
        def once() -> None:
            if backward:
                solve_loss(solver, z.clone().requires_grad_(True), y).backward()
                disc.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    solve_loss(solver, z, y)
        return median_seconds(once, device, min_time)

    rows = []
    for name, solver in (("eager", unipc_bh1), ("graph", GraphedSolver(unipc_bh1))):
        row = {"solver": name,
               "train_solve_backward_b2_s": timed(solver, train.z[:2], train.y[:2], backward=True),
               "resolve_b2_s": timed(solver, train.z[:2], train.y[:2], backward=False),
               f"validation_b{len(val)}_s": timed(solver, val.z, val.y, backward=False)}
        row["iteration_s"] = sum(v for k, v in row.items() if k.endswith("_s"))
        rows.append(row)
    return rows


def bench_recipe(net: torch.nn.Module, device: torch.device, quick: bool, deadline: float, min_time: float,
                 default_seeds: list[int]) -> dict:
    n = 6 if quick else 50
    rounds = (1, 1) if quick else (2, 5)
    train, val = teacher_data(net, device, n, n)
    costs = solve_costs(net, train, val, device, min_time)
    print(f"recipe: solve costs {costs}", flush=True)
    rows = []
    for variant in recipe_variants(device, n, default_seeds):
        if time.perf_counter() > deadline:
            rows.append({"name": variant.name, "setting": variant.setting, "skipped": "time budget spent"})
            continue
        try:
            rows.append(run_recipe(net, variant, train, val, device, rounds))
        except Exception as error:  # noqa: BLE001 - one failing variant must not hide the others
            traceback.print_exc()
            rows.append({"name": variant.name, "setting": variant.setting, "error": f"{type(error).__name__}: {error}"})
        print(f"recipe: {rows[-1].get('name')}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()
                                                             if isinstance(v, float)), flush=True)
    summary = summarise_settings(rows)
    baseline = next((r for r in summary if r["setting"] == DEFAULTS), None)
    fastest = None
    if baseline is not None:
        good = [r for r in summary if r["mean_final_val_rmse"] <= baseline["mean_final_val_rmse"]]
        fastest = min(good, key=lambda r: r["mean_wall_s"])["setting"]
    return {"samples": {"train": n, "val": n}, "rounds": rounds, "solve_costs": costs, "variants": rows,
            "settings": summary, "fastest_no_worse_than_defaults": fastest}


# ---- 4. SD-size memory --------------------------------------------------------------------------
def sd_denoiser(device: torch.device, quick: bool) -> DiffusersDenoiser:
    """An SD-1.5-size UNet2DConditionModel (random weights, seed 0) with CFG 7.5 on a random negative prompt."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = QUICK_SD_UNET if quick else SD15_UNET
    with device:
        unet = UNet2DConditionModel(**config)
        negative = torch.randn(1, 77, config["cross_attention_dim"])
    return DiffusersDenoiser(unet, VPDiscreteSchedule.scaled_linear(), "epsilon", guidance_scale=7.5,
                             unconditional=negative)


def sd_training_step(denoiser: DiffusersDenoiser, disc: LearnableDiscretization, z: Tensor, y: Tensor,
                     cond: Tensor) -> None:
    """One LD3 step: solve from a slack latent with the learnable grid, L2 loss, backward."""
    z_leaf = z.clone().requires_grad_(True)
    sigmas, sigmas_eval = disc()
    x = unipc_bh2(denoiser, disc.sigma_max * z_leaf, sigmas, sigmas_eval, order=3, cond=cond)
    l2_loss(x, y).mean().backward()
    disc.zero_grad(set_to_none=True)


def bench_sd(device: torch.device, quick: bool, min_time: float) -> dict:
    denoiser = sd_denoiser(device, quick)
    params = sum(p.numel() for p in denoiser.net.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, *denoiser.shape, generator=gen).to(device)
    y = torch.randn(1, *denoiser.shape, generator=gen).to(device)
    cond = torch.randn(1, 77, denoiser.net.config.cross_attention_dim, generator=gen).to(device)
    disc = LearnableDiscretization(10, denoiser.schedule, device=device)
    rows = []
    for precision in ("default", "bf16"):
        for checkpointing in (False, True):
            denoiser.autocast_bf16 = set_precision(precision)
            denoiser.gradient_checkpointing = checkpointing
            row = {"precision": precision, "gradient_checkpointing": checkpointing}
            reset_peak(device)
            try:
                row["s_per_step"] = median_seconds(lambda: sd_training_step(denoiser, disc, z, y, cond), device,
                                                   min_time, min_reps=2)
                row["peak_gib"] = peak_gib(device)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            print(f"sd: {row}", flush=True)
    return {"unet_parameters": params, "latent": list(denoiser.shape), "nfe": 10, "batch": 1, "cfg_scale": 7.5,
            "rows": rows}


# ---- 5. issue 20's workload -----------------------------------------------------------------------
EDM_SIGMA_DATA = 0.5
WORKLOAD_SCHEDULE = EDMSchedule(0.002, 80.0)
LATENT_BATCH = 20  # latents drawn after torch.manual_seed(1), this many at a time
WORKLOAD_NFE = 10
ISSUE_RMSE = {"reference learned": 0.002149, "ld3 learned (issue)": 0.002238, "logsnr_uniform": 0.04497,
              "edm_rho": 0.2519}  # issue 20's side-by-side numbers on one H200, for comparison


class EDMPreconditionedUNet(DenoiserAdapter):
    """A diffusers ``UNet2DModel`` F as an EDM denoiser D = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022,
    Table 1: sigma_data 0.5, c_noise = log(sigma) / 4), sigma in [0.002, 80]."""

    def __init__(self, net: torch.nn.Module):
        size = net.config.sample_size
        super().__init__(WORKLOAD_SCHEDULE, (net.config.in_channels, size, size))
        self.net = net

    def _denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        c_skip, c_out, c_in, c_noise = (c.to(x.dtype).reshape(-1, 1, 1, 1)
                                        for c in edm_preconditioning(sigma, EDM_SIGMA_DATA))
        return c_skip * x + c_out * self.net(c_in * x, c_noise.reshape(-1)).sample


def workload_data(denoiser: EDMPreconditionedUNet, device: torch.device, n_train: int,
                  n_val: int) -> tuple[TeacherData, TeacherData]:
    """Teacher pairs of the workload: latents on the device after ``torch.manual_seed(1)``, 20 at a time, and
    UniPC-3 bh1 NFE 20 on EDM's rho=7 grid from x_T = 80 z; the first ``n_train`` train, the next ``n_val`` validate."""
    torch.manual_seed(1)
    count = n_train + n_val
    z = torch.cat([torch.randn(LATENT_BATCH, *denoiser.shape, device=device)
                   for _ in range(math.ceil(count / LATENT_BATCH))])[:count]
    sigmas = edm_rho(TEACHER["nfe"], WORKLOAD_SCHEDULE, rho=TEACHER["rho"]).to(device)
    y = sample(denoiser, unipc_bh1, TEACHER["order"], sigmas, z, batch_size=LATENT_BATCH)
    return TeacherData(z[:n_train], y[:n_train]), TeacherData(z[n_train:], y[n_train:])


def mean_rmse(denoiser: EDMPreconditionedUNet, val: TeacherData, sigmas: Tensor, sigmas_eval: Tensor | None) -> float:
    """Mean over the validation samples of the per-sample RMSE to the teacher, from the original latents."""
    x = sample(denoiser, unipc_bh1, 3, sigmas, val.z, sigmas_eval=sigmas_eval, batch_size=len(val))
    return float((x - val.y).double().pow(2).flatten(1).mean(dim=1).sqrt().mean())


def workload_config(device: torch.device, n_val: int, rounds: tuple[int, int], **overrides) -> LD3Config:
    """The recipe with the fast setting (bench section 3): graphs on CUDA, one-batch slack pass and checks."""
    recipe = {"rounds_v1": rounds[0], "rounds_v2": rounds[1], "train_batch_size": 2, "mode": "lambda",
              "decoupled": True, "loss": "l2", "cuda_graphs": device.type == "cuda", "val_slack_batch_size": n_val,
              "val_solve_batch_size": n_val}
    return LD3Config(**{**recipe, **overrides})


def workload_setup(device: torch.device, tiny: bool) -> tuple[EDMPreconditionedUNet, TeacherData, TeacherData, tuple]:
    set_precision("default")
    denoiser = EDMPreconditionedUNet(cifar_unet(device, tiny))
    n = 6 if tiny else 50
    return (denoiser, *workload_data(denoiser, device, n, n), (1, 1) if tiny else (2, 5))


def bench_workload(setup: tuple, device: torch.device, variants: list[str], seeds: list[int]) -> dict:
    """Baselines, then one trial of the recipe (fast setting) per trainer variant (``bench/parity_cpu.py``'s
    VARIANTS: LD3Config overrides and reference behaviours patched in) and batch-order seed, timed."""
    denoiser, train, val, rounds = setup
    baselines = {name: mean_rmse(denoiser, val, grid(WORKLOAD_NFE, WORKLOAD_SCHEDULE).to(device), None)
                 for name, grid in (("logsnr_uniform", logsnr_uniform), ("edm_rho", edm_rho))}
    runs = []
    for name in variants:
        for seed in seeds:
            with parity_variant(name) as overrides:
                reset_peak(device)
                synchronize(device)
                start = time.perf_counter()
                result = train_ld3(denoiser, "unipc_bh1", 3, WORKLOAD_SCHEDULE, train, val,
                                   workload_config(device, len(val), rounds, seed=seed, **overrides), nfe=WORKLOAD_NFE)
                synchronize(device)
                wall = time.perf_counter() - start
            runs.append({"variant": name, "seed": seed, "overrides": overrides, "wall_s": wall, "steps": result.steps,
                         "s_per_iteration": wall / max(result.steps, 1), "peak_gib": peak_gib(device),
                         "rmse_learned": mean_rmse(denoiser, val, result.sigmas.to(device),
                                                   result.sigmas_eval.to(device)),
                         "stop_reason": result.stop_reason,
                         "sigmas": result.sigmas.tolist(), "sigmas_eval": result.sigmas_eval.tolist()})
            print(f"workload: {name} seed {seed}: RMSE {runs[-1]['rmse_learned']:.6f}, {wall:.1f} s", flush=True)
    return {"samples": {"train": len(train), "val": len(val)}, "rounds": rounds, "rmse_baselines": baselines,
            "issue_numbers": ISSUE_RMSE, "runs": runs}


# ---- 6. bundles: K trials in one batched solve ------------------------------------------------------
def bench_bundles(setup: tuple, device: torch.device, sizes: list[int], slack_rows: int) -> list[dict]:
    """Trials/hour of LD3Bundle for each K (trials = batch orders 0 .. K-1 of the fast recipe).

    The validation slack pass backpropagates ``val_slack_batch_size`` x K samples at once: it is capped to about
    ``slack_rows`` rows (memory), which changes how the pass is batched, not what it computes."""
    denoiser, train, val, rounds = setup
    rows = []
    for k in sizes:
        slack_batch = max(1, min(len(val), slack_rows // k))
        configs = [workload_config(device, len(val), rounds, seed=seed, val_slack_batch_size=slack_batch)
                   for seed in range(k)]
        reset_peak(device)
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            outcomes = LD3Bundle(denoiser, "unipc_bh1", 3, WORKLOAD_SCHEDULE, train, val, configs,
                                 nfe=WORKLOAD_NFE).run()
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large K: report, try the next
            traceback.print_exc()
            rows.append({"trials": k, "error": f"{type(error).__name__}: {error}"})
            continue
        synchronize(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rmse = [mean_rmse(denoiser, val, o.sigmas.to(device), o.sigmas_eval.to(device))
                if isinstance(o, LD3Result) else math.nan for o in outcomes]
        rows.append({"trials": k, "val_slack_batch_size": slack_batch, "wall_s": wall, "cpu_s": cpu,
                     "trials_per_hour": 3600 * k / wall,
                     "peak_gib": peak_gib(device), "steps": [getattr(o, "steps", None) for o in outcomes],
                     "rmse_seed0": rmse[0], "rmse_mean": statistics.fmean(rmse), "rmse_max": max(rmse), "rmse": rmse})
        print(f"bundles: K={k}: {rows[-1]['wall_s']:.1f} s, {rows[-1]['trials_per_hour']:.0f} trials/h", flush=True)
    single = next((r for r in rows if r["trials"] == 1 and "wall_s" in r), None)
    for row in rows:
        if single is not None and "wall_s" in row:
            row["speedup_vs_k1"] = row["trials_per_hour"] / single["trials_per_hour"]
    return rows


# ---- 7. step: where one training step's time goes ------------------------------------------------------
def step_parts(bundle: LD3Bundle, device: torch.device, min_time: float) -> list[dict]:
    """Medians of one training step's solves, through the bundle's own step methods, for early (first
    ``val_batch_size`` samples per trial) and whole-set checks: the training solve + backward, the merged
    accept + check solve, the old split (accept re-solve, then check) and the whole step (``LD3Bundle._step``)."""
    trials, k = bundle.trials, len(bundle.trials)
    idx = {t: torch.arange(bundle.shared.train_batch_size, device=device) for t in trials}
    grids, _, _, solved = bundle._training_solve(idx)
    candidates = bundle._candidates(bundle.train, idx, solved)
    judged = bundle._candidate_rows(candidates, solved, {t: tuple(g.detach() for g in grids[t]) for t in candidates})
    n_judged = sum(len(r.z) for r in judged)
    with torch.no_grad():
        after = {t: t.disc() for t in trials}
    train_s = median_seconds(lambda: bundle._training_solve(idx), device, min_time)
    accept_s = median_seconds(lambda: bundle._row_losses(judged, n_judged), device, min_time)
    rows = []
    for whole in (False, True):
        for t in trials:
            t.val_on_all = whole  # patience never runs out here, so the step keeps this check width
        counts = bundle._check_counts(trials)
        checks = bundle._check_rows(trials, bundle.val, {t: t.z_val for t in trials}, counts, after)
        batch = bundle._check_batch(k)
        row = {"trials": k, "check_rows_per_trial": counts[trials[0]], "train_solve_backward_s": train_s,
               "accept_solve_s": accept_s,
               "check_solve_s": median_seconds(lambda: bundle._row_losses(checks, batch), device, min_time),  # noqa: B023
               "merged_solve_s": median_seconds(lambda: bundle._row_losses(judged + checks, batch + n_judged),  # noqa: B023
                                                device, min_time),
               "step_s": median_seconds(lambda: bundle._step(idx), device, min_time)}
        row["split_parts_s"] = train_s + accept_s + row["check_solve_s"]
        row["merged_parts_s"] = train_s + row["merged_solve_s"]
        row["saved_s"] = row["split_parts_s"] - row["merged_parts_s"]
        rows.append(row)
        print(f"step: K={k}, {row['check_rows_per_trial']} check rows/trial: step {row['step_s']:.4f} s, "
              f"merged solve {row['merged_solve_s']:.4f} s vs accept + check {accept_s + row['check_solve_s']:.4f} s",
              flush=True)
    return rows


def bench_step(setup: tuple, device: torch.device, sizes: list[int], slack_rows: int, min_time: float) -> dict:
    """Anatomy of a training step of ``LD3Bundle`` on the workload (fast setting, K trials = seeds 0 .. K-1) for each
    K: ``step_parts``, and the validation slack pass of one round (its batch capped as in the bundles section)."""
    denoiser, train, val, rounds = setup
    rows, slack = [], []
    for k in sizes:
        slack_batch = max(1, min(len(val), slack_rows // k))
        configs = [workload_config(device, len(val), rounds, seed=seed, val_slack_batch_size=slack_batch,
                                   patience=10**9) for seed in range(k)]
        bundle = LD3Bundle(denoiser, "unipc_bh1", 3, WORKLOAD_SCHEDULE, train, val, configs, nfe=WORKLOAD_NFE)
        try:
            rows += step_parts(bundle, device, min_time)
            seconds = median_seconds(lambda: bundle._validation_slack_pass(bundle.trials), device, min_time)  # noqa: B023
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large K: report, try the next
            traceback.print_exc()
            slack.append({"trials": k, "error": f"{type(error).__name__}: {error}"})
            continue
        slack.append({"trials": k, "val_slack_batch_size": slack_batch, "slack_pass_s": seconds,
                      "steps_per_round": math.ceil(len(train) / configs[0].train_batch_size)})
    return {"rows": rows, "slack_pass": slack}


# ---- report ---------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (header, key, format)."""
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return row.get("error", row.get("skipped", "")) if key == columns[-1][1] else ""
        return format(value, fmt) if fmt else str(value)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(results: dict) -> str:
    parts = [f"environment: {json.dumps(results['environment'])}"]
    if "floor" in results:
        parts += ["", "floor: network forward, samples x NFE / s (no grad)", table(results["floor"], [
            ("precision", "precision", ""), ("batch", "batch", "d"), ("eager", "eager_per_s", ",.0f"),
            ("CUDA graph", "graph_per_s", ",.0f")])]
    if "teacher" in results:
        parts += ["", "teacher: UniPC-3 NFE 20, samples x NFE / s", table(results["teacher"], [
            ("precision", "precision", ""), ("batch", "batch", "d"), ("eager", "eager_per_s", ",.0f"),
            ("graphed", "graph_per_s", ",.0f"), ("best / floor", "fraction_of_floor", ".1%")])]
    if "recipe" in results:
        recipe = results["recipe"]
        parts += ["", f"recipe: {recipe['samples']} samples, rounds {recipe['rounds']}, UniPC-3 NFE 10, L2",
                  table(recipe["variants"], [
                      ("setting", "name", ""), ("wall s", "wall_s", ".1f"), ("steps", "steps", "d"),
                      ("s / it", "s_per_iteration", ".3f"), ("round 1 s", "first_round_s", ".1f"),
                      ("steady s / it", "steady_s_per_iteration", ".3f"), ("peak GiB", "peak_gib", ".2f"),
                      ("final val RMSE", "final_val_rmse", ".5f")]),
                  "", "per setting (mean over its seeds)", table(recipe["settings"], [
                      ("setting", "setting", ""), ("runs", "runs", "d"), ("mean wall s", "mean_wall_s", ".1f"),
                      ("mean final RMSE", "mean_final_val_rmse", ".4f"), ("min", "min_rmse", ".4f"),
                      ("max", "max_rmse", ".4f")]),
                  f"fastest setting with mean final RMSE <= defaults': {recipe['fastest_no_worse_than_defaults']}",
                  "", "solves of one iteration (default precision), seconds",
                  table(recipe["solve_costs"], [(k, k, "" if k == "solver" else ".4f")
                                                for k in recipe["solve_costs"][0]])]
    if "sd" in results:
        sd = results["sd"]
        parts += ["", (f"sd: LD3 step through NFE 10 of a {sd['unet_parameters'] / 1e6:.0f}M-parameter UNet, "
                      f"latent {sd['latent']}, batch 1, CFG {sd['cfg_scale']}"),
                  table(sd["rows"], [("precision", "precision", ""), ("checkpointing", "gradient_checkpointing", ""),
                                     ("s / step", "s_per_step", ".3f"), ("peak GiB", "peak_gib", ".2f")])]
    if "workload" in results:
        w = results["workload"]
        parts += ["", (f"workload (issue 20): {w['samples']} samples, rounds {w['rounds']}, UniPC-3 bh1 NFE 10; "
                       f"mean per-sample RMSE; baselines {json.dumps(w['rmse_baselines'])}"),
                  table(w["runs"], [("variant", "variant", ""), ("seed", "seed", "d"), ("wall s", "wall_s", ".1f"),
                                    ("steps", "steps", "d"), ("peak GiB", "peak_gib", ".2f"),
                                    ("RMSE learned", "rmse_learned", ".6f")]),
                  f"issue 20's numbers for comparison: {w['issue_numbers']}"]
    if "bundles" in results:
        parts += ["", "bundles: K trials (batch orders 0..K-1) in one batched solve, the workload's recipe",
                  table(results["bundles"], [
                      ("K", "trials", "d"), ("slack batch", "val_slack_batch_size", "d"), ("wall s", "wall_s", ".1f"),
                      ("process CPU s", "cpu_s", ".1f"),
                      ("trials / h", "trials_per_hour", ",.0f"), ("x K=1", "speedup_vs_k1", ".2f"),
                      ("peak GiB", "peak_gib", ".2f"), ("RMSE seed 0", "rmse_seed0", ".6f"),
                      ("mean RMSE", "rmse_mean", ".6f"), ("max RMSE", "rmse_max", ".6f")])]
    if "step" in results:
        step = results["step"]
        parts += ["", "step: one training step's solves (medians, s): split = train + accept + check, merged = train + "
                      "one accept+check solve; step = LD3Bundle._step as it runs",
                  table(step["rows"], [
                      ("K", "trials", "d"), ("check rows/trial", "check_rows_per_trial", "d"),
                      ("train+bwd", "train_solve_backward_s", ".4f"), ("accept", "accept_solve_s", ".4f"),
                      ("check", "check_solve_s", ".4f"), ("merged", "merged_solve_s", ".4f"),
                      ("split sum", "split_parts_s", ".4f"), ("merged sum", "merged_parts_s", ".4f"),
                      ("saved", "saved_s", ".4f"), ("step", "step_s", ".4f")]),
                  "", "validation slack pass, one round (s)", table(step["slack_pass"], [
                      ("K", "trials", "d"), ("slack batch", "val_slack_batch_size", "d"),
                      ("steps / round", "steps_per_round", "d"), ("slack pass s", "slack_pass_s", ".3f")])]
    return "\n".join(parts)


def write_json(results: dict, folder: Path) -> Path:
    return atomic_write_bytes(folder / "gpu.json", json.dumps(results, indent=2, default=str).encode())


SECTIONS = ("floor", "teacher", "recipe", "sd", "workload", "bundles", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--quick", "--tiny", action="store_true", help="tiny network and data: checks the script")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--batch-sizes", default=None, help="floor/teacher batch sizes (default 1,2,16,64,256,1024)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of repeats per timing (default 0.5)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which recipe variants are skipped")
    parser.add_argument("--default-seeds", default="0", help="batch-order seeds of the eager-defaults recipe runs (default 0)")
    parser.add_argument("--bundle-sizes", default=None, help="trials per bundle K (default 1,2,4,8,16; --tiny 1,2,4)")
    parser.add_argument("--bundle-rounds", default=None,
                        help="rounds 'v1,v2' of the bundles' trials (default: the recipe's 2,5; --tiny 1,1)")
    parser.add_argument("--slack-rows", type=int, default=50,
                        help="rows of the bundles' validation slack pass, about (memory; default 50)")
    parser.add_argument("--variants", default="defaults",
                        help=f"workload section: trainer variants, comma-separated, of {tuple(VARIANTS)} (default: defaults)")
    parser.add_argument("--workload-seeds", default="0", help="workload section: batch-order seeds (default 0)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu.json (default: $OUT or .)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the tiny --quick sizes only lose to thread contention
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    default_sizes = "2,4" if args.quick else "1,2,16,64,256,1024"
    batch_sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",")]
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5)
    start = time.perf_counter()
    results: dict = {"environment": environment(device)}
    bundle_sizes = [int(k) for k in (args.bundle_sizes or ("1,2,4" if args.quick else "1,2,4,8,16")).split(",")]
    cached: dict = {}

    def workload() -> tuple:
        if "setup" not in cached:
            cached["setup"] = workload_setup(device, args.quick)
        return cached["setup"]

    def bundle_setup() -> tuple:
        if args.bundle_rounds is None:
            return workload()
        return (*workload()[:3], tuple(int(r) for r in args.bundle_rounds.split(",")))

    net = cifar_unet(device, args.quick)
    results["cifar_unet_parameters"] = sum(p.numel() for p in net.parameters())
    print(f"UNet2DModel (DDPM CIFAR-10 config): {results['cifar_unet_parameters']:,} parameters", flush=True)
    steps: dict[str, Callable[[], object]] = {
        "floor": lambda: bench_floor(net, batch_sizes, device, min_time),
        "teacher": lambda: bench_teacher(net, batch_sizes, device, min_time, results.get("floor", [])),
        "recipe": lambda: bench_recipe(net, device, args.quick, start + args.budget, min_time,
                                       [int(seed) for seed in args.default_seeds.split(",")]),
        "sd": lambda: bench_sd(device, args.quick, min_time),
        "workload": lambda: bench_workload(workload(), device, args.variants.split(","),
                                           [int(seed) for seed in args.workload_seeds.split(",")]),
        "bundles": lambda: bench_bundles(bundle_setup(), device, bundle_sizes, args.slack_rows),
        "step": lambda: bench_step(workload(), device, bundle_sizes, args.slack_rows, min_time),
    }
    for name in sections:
        section_start = time.perf_counter()
        try:
            results[name] = steps[name]()
        except Exception as error:  # noqa: BLE001 - report what ran, keep going
            traceback.print_exc()
            results[f"{name}_error"] = f"{type(error).__name__}: {error}"
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - section_start
        write_json(results, Path(args.out))
        print(f"[{name} done in {time.perf_counter() - section_start:.1f} s]", flush=True)
    print()
    print(report(results))


if __name__ == "__main__":
    main()
