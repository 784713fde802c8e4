"""Checks a study makes before anything is written: its folders, the Ray address, the resources the in-process
Ray must have. Each failure is one line naming the flag and the fix (a project error, pipeline.errors)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import ray
import torch

from pipeline.errors import StudyError, StudyInputError
from pipeline.fileio import check_writable_dir
from pipeline.teacher.store import resolve_root


def is_uri(path: str) -> bool:
    return "://" in path


def check_paths(folders: Mapping[str, str]) -> None:
    """Folders (flag -> path) can be made and written, URIs name a filesystem pyarrow knows; nothing is created."""
    for argument, path in folders.items():
        if not is_uri(path):
            check_writable_dir(path, argument)
            continue
        try:
            resolve_root(path)
        except ValueError as err:
            raise StudyInputError(f"{argument}: {err}") from None


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast with a one-line error when a ``host:port`` Ray address does not answer."""
    if address in (None, "auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise StudyError(f"--address {address!r} is not 'auto' or host:port; give the head node's host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise StudyError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with `ray start --head` "
            "or `ray up ray_cluster.yaml`, or drop --address to run locally"
        ) from None


def check_resources(asks: Mapping[str, tuple[float, str]], num_cpus: int | None, address: str | None) -> None:
    """The in-process Ray a study starts must have the CPUs and GPUs each of its tasks asks for (otherwise Ray
    waits forever). ``asks``: what -> (amount, "cpu" | "gpu"). A cluster (``address``) may add nodes and a Ray the
    caller started has its own resources, so those are not checked."""
    if num_cpus is not None and num_cpus < 1:
        raise StudyError(f"--num-cpus {num_cpus}: Ray needs at least 1 CPU; give a positive number or drop it")
    if address is not None or ray.is_initialized():
        return
    available = {"cpu": num_cpus or os.cpu_count() or 1, "gpu": torch.cuda.device_count()}
    for what, (wanted, kind) in asks.items():
        if wanted > available[kind]:
            raise StudyError(f"{what} is {wanted:g}, but this machine's Ray has {available[kind]}; lower it, raise "
                             "--num-cpus (CPUs), or run on a cluster with --address auto")
