"""Fixtures shared by several test modules."""

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
