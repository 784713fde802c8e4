"""Trainer speed options leave the algorithm unchanged: batched validation slack pass, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from ld3.discretizations import edm_rho
from ld3.models.gmm import default_gmm
from ld3.schedules import EDMSchedule
from ld3.solvers import unipc_bh1
from ld3.train import LD3Config, TeacherData, train_ld3
from ld3.utils import latents_from_seeds

SCHEDULE = EDMSchedule(0.002, 80.0)
# Two rounds with a slack radius large enough that validation latents move in the slack pass.
CONFIG = LD3Config(rounds_v1=1, rounds_v2=1, train_batch_size=3, slack_radius=2.0)


def teacher_data(gmm, seeds, dtype, device="cpu") -> TeacherData:
    z = latents_from_seeds(seeds, gmm.shape, dtype, device)
    with torch.no_grad():
        y = unipc_bh1(gmm, SCHEDULE.sigma_max * z, edm_rho(20, SCHEDULE).to(device), order=3)
    return TeacherData(z, y)


def train(config: LD3Config, dtype=torch.float64, device="cpu"):
    gmm = default_gmm().to(device=device, dtype=dtype)
    data = teacher_data(gmm, range(7), dtype, device), teacher_data(gmm, range(100, 107), dtype, device)
    return train_ld3(gmm, "unipc_bh1", 3, SCHEDULE, *data, config, nfe=5)


@pytest.mark.parametrize("batch", [2, 7])
def test_batched_validation_slack_pass_takes_the_per_train_batch_steps(batch):
    """7 validation samples in train batches of 3 (3, 3, 1): any slack batch gives the same latent steps."""
    reference = train(CONFIG)
    batched = train(LD3Config(**{**vars(CONFIG), "val_slack_batch_size": batch}))
    assert reference.history[-1].shift_lr == batched.history[-1].shift_lr
    torch.testing.assert_close(batched.sigmas, reference.sigmas, rtol=1e-10, atol=0)
    torch.testing.assert_close(batched.sigmas_eval, reference.sigmas_eval, rtol=1e-10, atol=0)
    assert batched.final_val_loss == pytest.approx(reference.final_val_loss, rel=1e-10)


def test_validation_slack_batch_size_is_validated():
    with pytest.raises(ValueError, match="val_slack_batch_size"):
        LD3Config(val_slack_batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_train_the_same_schedule():
    eager = train(CONFIG, torch.float32, "cuda")
    graphed = train(LD3Config(**{**vars(CONFIG), "cuda_graphs": True}), torch.float32, "cuda")
    assert graphed.steps == eager.steps
    torch.testing.assert_close(graphed.sigmas, eager.sigmas, rtol=1e-4, atol=0)
    assert graphed.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)
