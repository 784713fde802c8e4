"""Trainer speed options leave the algorithm unchanged: batched validation slack pass, CUDA graphs."""

from __future__ import annotations

import warnings

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


def test_validation_solve_batch_size_changes_only_how_checks_are_batched():
    """Early checks still use the first val_batch_size samples; solving them in other batches gives the same run."""
    config = LD3Config(**{**vars(CONFIG), "val_batch_size": 4, "patience": 1, "lr1": 0.05})  # whole-set checks soon
    reference = train(config)
    assert any(m.val_on_all for m in reference.history) and not reference.history[0].val_on_all
    batched = train(LD3Config(**{**vars(config), "val_solve_batch_size": 7}))
    assert [m.val_loss for m in batched.history] == pytest.approx([m.val_loss for m in reference.history], rel=1e-12)
    assert [m.val_on_all for m in batched.history] == [m.val_on_all for m in reference.history]
    assert batched.final_val_loss == pytest.approx(reference.final_val_loss, rel=1e-12)


@pytest.mark.parametrize("field", ["val_slack_batch_size", "val_solve_batch_size"])
def test_validation_batch_sizes_are_validated(field):
    with pytest.raises(ValueError, match=field):
        LD3Config(**{field: 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_train_the_same_schedule():
    eager = train(CONFIG, torch.float32, "cuda")
    graphed = train(LD3Config(**{**vars(CONFIG), "cuda_graphs": True}), torch.float32, "cuda")
    assert graphed.steps == eager.steps
    torch.testing.assert_close(graphed.sigmas, eager.sigmas, rtol=1e-4, atol=0)
    assert graphed.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_training_synchronises_with_the_host_once_per_step():
    """Between two validation checks the host never waits for the GPU, so it queues the next step's kernels
    while the last ones run: counted with PyTorch's sync debug mode, one warning per synchronising call."""
    steps: list[tuple[int, bool, int]] = []  # (round, val_on_all, synchronising calls so far) at each step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            config = LD3Config(**{**vars(CONFIG), "cuda_graphs": True, "rounds_v2": 2})
            gmm = default_gmm().to(device="cuda", dtype=torch.float32)
            data = (teacher_data(gmm, range(7), torch.float32, "cuda"),
                    teacher_data(gmm, range(100, 107), torch.float32, "cuda"))
            count = lambda: sum("synchronizing" in str(w.message) for w in caught)  # noqa: E731
            train_ld3(gmm, "unipc_bh1", 3, SCHEDULE, *data, config, nfe=5,
                      callbacks=[lambda m: steps.append((m.round, m.val_on_all, count()))])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Graphs are captured in the first round. Switching the checks to the whole validation set (once, by
    # patience) re-scores the best state: one extra sync, so such a step is not compared.
    pairs = [(a[2], b[2]) for a, b in zip(steps, steps[1:]) if a[0] == b[0] > 0 and a[1] == b[1]]
    assert len(pairs) >= 2
    assert [b - a for a, b in pairs] == [1] * len(pairs)
