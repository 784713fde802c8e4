"""The public LD3 reference trainer on issue 20's workload, scored with our metric: a side-by-side check.

Runs ``LD3Trainer`` from a local checkout of https://github.com/vinhsuhi/LD3 (not part of this repository;
its ``trainer.py``, ``dataset.py``, ``utils.py``, ``noise_schedulers.py`` and ``samplers/`` are imported
unmodified) on the teacher pairs of ``bench/gpu.py``'s workload section (the DDPM-CIFAR-10 UNet
architecture with random weights, EDM preconditioning, latents after ``torch.manual_seed(1)``), with the
recipe of its ``configs/cifar10.yml`` and L2 instead of LPIPS (lr_time_1 0.005, lr_time_2 0.1 / N,
shift_lr 12 / N, prior_bound 0.001·C·H·W / N², train batch 2, valid batch 150, 2 + 5 rounds, UniPC-3 bh1
at NFE 10, lambda mode), its model wrapper returning float64 noise predictions as its EDM wrapper does.
Its best ``params1/params2`` are then scored with ``bench/gpu.py``'s ``mean_rmse`` (mean over the
validation samples of the per-sample RMSE to the teacher, on the original latents), the number the
``workload`` section reports for our trainer.

Imports the reference needs only for plots or other losses (lpips, imageio, matplotlib, yaml, scipy) are
replaced by empty modules where missing; its plots and GIFs are switched off.

    git clone https://github.com/vinhsuhi/LD3 /tmp/ld3-reference
    python bench/reference_ld3.py --reference /tmp/ld3-reference            # CUDA
    python bench/reference_ld3.py --reference /tmp/ld3-reference --tiny     # CPU, tiny network: checks the script
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import gpu  # noqa: E402

OPTIONAL_IMPORTS = ("lpips", "imageio", "matplotlib", "matplotlib.pyplot", "yaml", "scipy", "scipy.optimize")
N_STEPS = 10


def stub_missing(names: tuple[str, ...]) -> None:
    """Empty modules for the reference's imports that this run never uses, where they are not installed."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.minimize = module.LinearConstraint = None  # scipy.optimize names imported by its samplers
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)


def reference_dataset(dataset_class, data):
    """The reference's LD3Dataset of (original latent, latent, target) per sample, unconditional."""
    z, y = data.z.cpu(), data.y.cpu()
    return dataset_class([v.clone() for v in z], [v.clone() for v in z], list(y), [None] * len(z), [None] * len(z))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="folder of a checkout of github.com/vinhsuhi/LD3")
    parser.add_argument("--tiny", action="store_true", help="bench/gpu.py's tiny network and data, on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="torch's global seed (the reference's batch order)")
    args = parser.parse_args()
    if not (Path(args.reference) / "trainer.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no trainer.py there; clone github.com/vinhsuhi/LD3 first")
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.Tensor.cuda = lambda self, *a, **k: self  # the reference moves its parameters with .cuda()
    denoiser, train, val, rounds = gpu.workload_setup(device, args.tiny)  # imports diffusers before the stubs
    stub_missing(OPTIONAL_IMPORTS)
    sys.path.insert(0, str(Path(args.reference).resolve()))
    trainer = importlib.import_module("trainer")
    dataset_class = importlib.import_module("dataset").LD3Dataset
    unipc_class = importlib.import_module("samplers.uni_pc").UniPC
    schedule = importlib.import_module("noise_schedulers").NoiseScheduleVE(schedule="edm")
    trainer.save_gif = lambda *a, **k: None
    trainer.LD3Trainer._visual_times = lambda self: None

    def noise_prediction(x, t, *args, **kwargs):  # its EDM wrapper: (x - D(x)) / sigma in float64
        return ((x - denoiser(x.float(), t.float())) / t[:, None, None, None]).to(torch.float64)

    channels, size, _ = denoiser.shape
    with tempfile.TemporaryDirectory() as snapshots:
        training = trainer.TrainingConfig(
            train_data=reference_dataset(dataset_class, train), valid_data=reference_dataset(dataset_class, val),
            train_batch_size=2, valid_batch_size=150, lr_time_1=0.005, lr_time_2=round(0.1 / N_STEPS, 8),
            shift_lr=round(12 / N_STEPS, 8), loss_type="L2", visualize=False)
        model = trainer.ModelConfig(
            net=noise_prediction, decoding_fn=lambda x: x, noise_schedule=schedule,
            solver=unipc_class(schedule, variant="bh1"), solver_name="uni_pc", order=3, steps=N_STEPS,
            prior_bound=round(0.001 * channels * size * size / N_STEPS**2, 8), resolution=size, channels=channels,
            time_mode="lambda", snapshot_path=snapshots, device=device)
        logging.disable(logging.CRITICAL)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        run = trainer.LD3Trainer(model, training)
        run.train(*rounds)
        wall = time.perf_counter() - start
        best = torch.load(os.path.join(snapshots, "best_v2.pt"))
    sigmas, sigmas_eval = trainer.discretize_model_wrapper(best["params1"], best["params2"], run.lambda_max,
                                                           run.lambda_min, schedule, "lambda", 0.5)()
    rmse = gpu.mean_rmse(denoiser, val, sigmas.detach().float().to(device), sigmas_eval.detach().float().to(device))
    print(json.dumps({"reference_rmse": rmse, "best_val_loss": run.best_loss, "steps": run.cur_iter, "wall_s": wall,
                      "seed": args.seed, "sigmas": sigmas.tolist(), "sigmas_eval": sigmas_eval.tolist()}))


if __name__ == "__main__":
    main()
