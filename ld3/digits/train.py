"""Train the digits model's two networks: ``python -m ld3.digits.train --out DIR [--device cuda]``.

1. The classifier of the quality metric (:mod:`ld3.digits.quality`): cross-entropy with ±1-pixel shifts.
2. The denoiser (:mod:`ld3.digits.denoiser`): the EDM loss (Karras et al. 2022, eq. 2 and Table 1):
   ln σ ~ N(P_mean, P_std²), weight λ(σ) = (σ² + σ_d²)/(σ σ_d)², labels dropped with probability
   ``label_dropout`` (the null label, for classifier-free guidance), Adam, an exponential moving
   average of the weights (the EMA is what is saved).
Both train on the training split only, seeded (random draws from a generator on the training device):
the same command on the same hardware and software draws the same batches, noise and labels; GPU kernels
may still differ in rounding between runs. Writes DIR/digits-edm.safetensors,
DIR/digits-classifier.safetensors and DIR/train-metrics.json (losses, held-out accuracy, digests).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3.digits.checkpoint import save_weights
from ld3.digits.data import load_split
from ld3.digits.denoiser import DigitsDenoiser
from ld3.digits.networks import CLASSIFIER_DEFAULTS, UNET_DEFAULTS, DigitsClassifier, DigitsUNet
from ld3.digits.shipped import CLASSIFIER_FILE, DENOISER_FILE


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background (-1)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    size, batch = x.shape[-1], x.shape[0]
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator, device=x.device)
    pixels = torch.arange(size, device=x.device)
    rows = (offsets[:, 0, None] + pixels)[:, :, None]  # [B, H, 1]
    cols = (offsets[:, 1, None] + pixels)[:, None, :]  # [B, 1, W]
    return padded[torch.arange(batch, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def train_classifier(x: Tensor, y: Tensor, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, list[float]]:
    """Cross-entropy training of :class:`DigitsClassifier` with random shifts; returns it and its loss curve."""
    gen = torch.Generator(device).manual_seed(args.seed)
    net = DigitsClassifier(**CLASSIFIER_DEFAULTS).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.classifier_lr, weight_decay=1e-4)
    x, y, losses = x.to(device), y.to(device), []
    for step in range(args.classifier_steps):
        index = torch.randint(0, len(x), (args.batch_size,), generator=gen, device=device)
        loss = F.cross_entropy(net(random_shift(x[index], gen)), y[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            losses.append(float(loss.detach()))
    return net.eval(), losses


def edm_loss(denoiser: DigitsDenoiser, x0: Tensor, labels: Tensor, gen: torch.Generator, p_mean: float, p_std: float) -> Tensor:
    """EDM's weighted denoising loss (Karras et al. 2022, eq. 2 with λ(σ) = 1/c_out², Table 1)."""
    device = x0.device
    sigma = (p_mean + p_std * torch.randn(x0.shape[0], generator=gen, device=device)).exp()
    noise = torch.randn(x0.shape, generator=gen, device=device)
    sd = denoiser.sigma_data
    weight = (sigma.square() + sd**2) / (sigma * sd).square()
    null = torch.full_like(labels, denoiser.n_classes)
    d = denoiser._network_d(x0 + sigma[:, None, None, None] * noise, sigma, torch.where(labels < 0, null, labels))
    return (weight[:, None, None, None] * (d - x0).square()).mean()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_denoiser(x: Tensor, y: Tensor, args: argparse.Namespace, device: torch.device, sigma_data: float
                   ) -> tuple[DigitsDenoiser, list[float]]:
    """EDM training of the UNet with label dropout and an EMA of the weights; returns the EMA denoiser."""
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    model = DigitsDenoiser(DigitsUNet(**UNET_DEFAULTS), sigma_data).to(device)
    model.net.train().requires_grad_(True)
    ema = copy.deepcopy(model.net).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.net.parameters(), lr=args.lr)
    x, y, losses, running = x.to(device), y.to(device), [], 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        index = torch.randint(0, len(x), (args.batch_size,), generator=gen, device=device)
        drop = torch.rand(args.batch_size, generator=gen, device=device) < args.label_dropout
        loss = edm_loss(model, x[index], torch.where(drop, -1, y[index]), gen, args.p_mean, args.p_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.net.parameters()), 1 - args.ema_decay)
        running = running + loss.detach()
        if (step + 1) % 1000 == 0:  # one device sync per 1000 steps
            losses.append(float(running) / 1000)
            print(f"denoiser step {step + 1}/{args.steps}  loss {losses[-1]:.4f}", flush=True)
            running = 0.0
    return DigitsDenoiser(ema, sigma_data).to(device), losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the two .safetensors files and train-metrics.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="an .npz copy of the digits (ld3.digits.data.save_npz); default: scikit-learn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40_000, help="denoiser optimisation steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--p-mean", type=float, default=-1.2)
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--classifier-steps", type=int, default=4000)
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # full fp32, as on the CPU
    x, y = load_split("train", args.data)
    x_held, y_held = load_split("heldout", args.data)
    sigma_data = round(float(x.std()), 3)  # the data's own standard deviation (EDM's σ_data)
    start = time.perf_counter()
    classifier, classifier_losses = train_classifier(x, y, args, device)
    with torch.no_grad():
        held_accuracy = float((classifier(x_held.to(device)).argmax(1).cpu() == y_held).double().mean())
    classifier_s = time.perf_counter() - start
    denoiser, losses = train_denoiser(x, y, args, device, sigma_data)
    denoiser_s = time.perf_counter() - start - classifier_s
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "device", "data")}
    digests = {
        CLASSIFIER_FILE: save_weights(out / CLASSIFIER_FILE, classifier, {"kind": "classifier", "network": CLASSIFIER_DEFAULTS,
                                                                          "train": recipe}),
        DENOISER_FILE: save_weights(out / DENOISER_FILE, denoiser.net, {"kind": "denoiser", "network": UNET_DEFAULTS,
                                                                        "sigma_data": sigma_data, "train": recipe}),
    }
    metrics = {"sigma_data": sigma_data, "classifier_heldout_accuracy": held_accuracy, "classifier_seconds": classifier_s,
               "denoiser_seconds": denoiser_s, "denoiser_loss_per_1000_steps": losses,
               "classifier_loss_per_100_steps": classifier_losses, "digests": digests, "recipe": recipe,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    (out / "train-metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: metrics[k] for k in ("sigma_data", "classifier_heldout_accuracy", "classifier_seconds",
                                              "denoiser_seconds", "digests")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
