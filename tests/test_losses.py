"""Per-sample losses: values, shapes, gradients, and the LPIPS plumbing with a random trunk."""

import pytest
import torch

from ld3.losses import (
    LOSS_NAMES,
    LPIPSLoss,
    MissingWeightsError,
    get_loss,
    l1_loss,
    l2_loss,
    lpips_backbone_weights_path,
)


def test_l2_and_l1_are_per_sample_means():
    a = torch.zeros(3, 2, 4, 4)
    b = torch.zeros(3, 2, 4, 4)
    b[1] = 2.0  # every pixel of sample 1 off by 2
    b[2, 0, 0, 0] = 4.0  # one pixel of sample 2 off by 4 (of 32 pixels)
    torch.testing.assert_close(l2_loss(a, b), torch.tensor([0.0, 4.0, 16.0 / 32]))
    torch.testing.assert_close(l1_loss(a, b), torch.tensor([0.0, 2.0, 4.0 / 32]))


def test_pixel_losses_keep_dtype_and_gradient():
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    loss = l2_loss(a, b)
    assert loss.dtype == torch.float64 and loss.shape == (2,)
    loss.sum().backward()
    torch.testing.assert_close(a.grad, 2 * (a - b).detach() / 75)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        l2_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


def test_get_loss_names_and_bad_names():
    assert set(LOSS_NAMES) == {"l2", "l1", "lpips"}
    assert get_loss("l2") is l2_loss and get_loss("l1") is l1_loss
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        get_loss("mse")
    with pytest.raises(ValueError, match="takes no options"):
        get_loss("l2", resize_to=32)


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPSLoss(net="vgg", pretrained_backbone=False, resize_to=32)


def test_lpips_random_trunk_is_a_per_sample_distance(random_lpips):
    torch.manual_seed(1)
    y = torch.rand(3, 3, 8, 8) * 2 - 1
    y_hat = (y + 0.3 * torch.randn_like(y)).requires_grad_(True)
    d = random_lpips(y_hat, y)
    assert d.shape == (3,)
    assert bool((d > 0).all())
    torch.testing.assert_close(random_lpips(y, y), torch.zeros(3), atol=1e-6, rtol=0)
    # Batched values equal the one-sample values (no mixing across the batch).
    torch.testing.assert_close(random_lpips(y_hat[1:2], y[1:2]), d[1:2], atol=1e-6, rtol=1e-5)
    d.sum().backward()
    assert y_hat.grad is not None and bool(y_hat.grad.abs().sum() > 0)
    assert not any(p.requires_grad for p in random_lpips.parameters())


def test_lpips_rejects_small_or_non_rgb_images(random_lpips, monkeypatch):
    loss = random_lpips
    monkeypatch.setattr(loss, "resize_to", None)
    with pytest.raises(ValueError, match="resize_to"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        loss(torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="backbone"):
        LPIPSLoss(net="resnet", pretrained_backbone=False)
    with pytest.raises(ValueError, match="at least 31 pixels for net='alex'"):
        LPIPSLoss(net="alex", pretrained_backbone=False, resize_to=16)


def test_missing_backbone_weights_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert lpips_backbone_weights_path("vgg") == expected
    with pytest.raises(MissingWeightsError) as info:
        get_loss("lpips")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and str(expected.parent) in message and "TORCH_HOME" in message
    assert "download.pytorch.org" in message
