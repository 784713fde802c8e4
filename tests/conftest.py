"""Fixtures shared by several test modules."""

import socket

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small solves and tiny networks run fastest on one intra-op thread; on shared CI cores more only contend.

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; the previous thread
    count is restored after the module.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on 2 CPUs for one test module (the CI machine's size), shut down after it.

    Ray is imported here, not at the top, so modules that need no Ray (and machines without it) never load it.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nobody listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
