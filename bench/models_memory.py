"""GPU memory and time of one LD3-style backward pass through a Stable-Diffusion-size model.

Builds a randomly initialised SD v1.x UNet (860M parameters) and VAE from their configs (no weights
needed), wraps them with ``DiffusersDenoiser`` (CFG 7.5), solves N Euler steps from a latent that
requires grad with learnable sigmas, decodes to 512² and backpropagates a loss, like one LD3 training
step at batch 1. Reports peak CUDA memory and time (second of two runs) for each memory option:

    python bench/models_memory.py --steps 6 --json bench_models_memory.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ld3.models import DiffusersDenoiser
from ld3.schedules import VPDiscreteSchedule
from ld3.solvers import euler
from ld3.utils import atomic_write_bytes

VARIANTS = {  # name -> (weights dtype, gradient_checkpointing, autocast_bf16)
    "fp32": (torch.float32, False, False),
    "fp32 + checkpointing": (torch.float32, True, False),
    "bf16 autocast": (torch.float32, False, True),
    "bf16 autocast + checkpointing": (torch.float32, True, True),
    "bf16 weights (torch_dtype)": (torch.bfloat16, False, False),
    "bf16 weights + checkpointing": (torch.bfloat16, True, False),
}


def sd_size_denoiser(device: torch.device) -> DiffusersDenoiser:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # other defaults are SD v1.x's
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
        negative_prompt = torch.randn(1, 77, 768)
    return DiffusersDenoiser(unet, VPDiscreteSchedule.scaled_linear(0.00085, 0.012), "epsilon", autoencoder=vae,
                             guidance_scale=7.5, unconditional=negative_prompt)


def training_step(denoiser: DiffusersDenoiser, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Solve, decode and backpropagate once; returns (seconds, decoded images)."""
    generator = torch.Generator(device).manual_seed(1)
    schedule = denoiser.schedule
    log_sigmas = torch.linspace(torch.tensor(schedule.sigma_max).log(), torch.tensor(schedule.sigma_min).log(),
                                steps + 1, device=device).requires_grad_()
    z = torch.randn(1, *denoiser.shape, device=device, generator=generator).requires_grad_()
    cond = torch.randn(1, 77, 768, device=device, generator=generator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = denoiser.decode(euler(denoiser, z * schedule.sigma_max, log_sigmas.exp(), cond=cond))
    images.square().mean().backward()
    torch.cuda.synchronize()
    assert z.grad is not None and log_sigmas.grad is not None
    return time.perf_counter() - start, images.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="Euler steps (NFE; each call runs the UNet on a CFG batch of 2)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda")
    denoiser = sd_size_denoiser(device)
    results, reference = {}, None
    for name, (weights_dtype, checkpointing, bf16) in VARIANTS.items():
        denoiser.to(weights_dtype)  # what the loaders' torch_dtype= gives; inputs stay float32
        denoiser.gradient_checkpointing, denoiser.autocast_bf16 = checkpointing, bf16
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            training_step(denoiser, args.steps, device)  # warm-up
            seconds, images = training_step(denoiser, args.steps, device)
        except torch.cuda.OutOfMemoryError:
            results[name] = {"peak_gib": None, "seconds": None, "note": "out of memory"}
            print(f"{name:32s} out of memory")
            continue
        reference = images if reference is None else reference
        deviation = float((images - reference).abs().max())
        results[name] = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": seconds,
                         "max_abs_image_difference_vs_first": deviation}
        print(f"{name:32s} peak {results[name]['peak_gib']:6.2f} GiB   {seconds:6.2f} s   max |image - first| {deviation:.3g}")
    report = {"device": torch.cuda.get_device_name(), "steps": args.steps, "batch": 1, "image": "3x512x512", "results": results}
    if args.json:
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
