"""Where a Ray worker runs its model, and tags that record the placement in MLflow."""

from __future__ import annotations

import socket
import warnings

import ray
import torch


def worker_device(num_gpus: float) -> torch.device:
    """CUDA when the worker was given GPUs and CUDA is usable, else the CPU.

    A cluster may declare GPU resources on a node whose torch build or driver cannot use them (or a test
    may declare them on a CPU machine); the work then runs on the CPU with a warning instead of failing.
    """
    if num_gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn(
        f"this Ray worker was given {num_gpus:g} GPU(s) but torch cannot use CUDA on {socket.gethostname()}; "
        "running on the CPU (install a CUDA build of torch on GPU nodes)",
        RuntimeWarning,
        stacklevel=2,
    )
    return torch.device("cpu")


def placement_tags(device: torch.device | str) -> dict[str, str]:
    """Tags saying where a piece of work ran: Ray node id (when inside Ray), host name and torch device."""
    tags = {"host": socket.gethostname(), "device": str(device)}
    if ray.is_initialized():
        tags["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return tags
