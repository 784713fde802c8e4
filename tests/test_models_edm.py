"""EDM pickles: files with the release structure are written in a separate process that has its own
``torch_utils``/``dnnlib`` (a minimal writer-side ``persistence`` embedding module source the way EDM's
does), then loaded here without those packages."""

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from ld3.losses import MissingWeightsError
from ld3.models.edm import EDMDenoiser, EmbeddedCodeError, load_edm_denoiser, load_edm_network

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.usefixtures("trusted_checkpoint_code")]

WRITER_PACKAGES = {
    "dnnlib/__init__.py": "from .util import EasyDict\n",
    "dnnlib/util.py": """
        class EasyDict(dict):
            def __getattr__(self, name):
                return self[name]
            def __setattr__(self, name, value):
                self[name] = value
    """,
    "torch_utils/__init__.py": "",
    "torch_utils/misc.py": "",
    "torch_utils/training_stats.py": "",
    # Writer side of the format: instances reduce to _reconstruct_persistent_obj(meta) with the source of
    # the whole defining module embedded (version 6, as in the EDM release files).
    "torch_utils/persistence.py": """
        import inspect
        import sys

        def persistent_class(cls):
            source = inspect.getsource(sys.modules[cls.__module__])

            class Persistent(cls):
                def __reduce__(self):
                    meta = dict(type="class", version=6, module_src=source, class_name=cls.__name__,
                                state=self.__getstate__())
                    return _reconstruct_persistent_obj, (meta,)

            Persistent.__name__ = Persistent.__qualname__ = cls.__name__
            Persistent.__module__ = cls.__module__
            return Persistent

        def _reconstruct_persistent_obj(meta):
            raise RuntimeError("writer-side stand-in; readers bring their own")
    """,
    "training/__init__.py": "",
    "training/networks.py": """
        import numpy as np
        import torch
        from torch_utils import persistence

        @persistence.persistent_class
        class Conv2d(torch.nn.Module):
            def __init__(self, in_channels, out_channels):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) * 0.3)
                self.bias = torch.nn.Parameter(torch.randn(out_channels) * 0.1)

            def forward(self, x):
                return torch.nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=1)

        @persistence.persistent_class
        class TinyUNet(torch.nn.Module):
            def __init__(self, img_resolution, in_channels, out_channels, label_dim=0):
                super().__init__()
                self.conv_in = Conv2d(in_channels, 8)
                self.noise_map = torch.nn.Linear(1, 8)
                self.label_map = torch.nn.Linear(label_dim, 8, bias=False) if label_dim else None
                self.conv_out = Conv2d(8, out_channels)

            def forward(self, x, noise_labels, class_labels=None):
                h = self.conv_in(x) + self.noise_map(noise_labels.reshape(-1, 1).to(x.dtype))[:, :, None, None]
                if self.label_map is not None:
                    h = h + self.label_map(class_labels.to(x.dtype))[:, :, None, None]
                return self.conv_out(torch.nn.functional.silu(h))

        @persistence.persistent_class
        class EDMPrecond(torch.nn.Module):
            def __init__(self, img_resolution, img_channels, label_dim=0, sigma_min=0, sigma_max=float("inf"),
                         sigma_data=0.5, model_type="TinyUNet"):
                super().__init__()
                self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
                self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
                self.model = globals()[model_type](img_resolution, img_channels, img_channels, label_dim)

            def forward(self, x, sigma, class_labels=None, force_fp32=False):
                x = x.to(torch.float32)
                sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
                if self.label_dim:
                    class_labels = torch.zeros([1, self.label_dim]) if class_labels is None else class_labels
                    class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
                s2 = sigma ** 2 + self.sigma_data ** 2
                c_skip, c_out, c_in = self.sigma_data ** 2 / s2, sigma * self.sigma_data / s2.sqrt(), 1 / s2.sqrt()
                F_x = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels=class_labels)
                assert F_x.dtype == torch.float32
                return c_skip * x + c_out * F_x
    """,
    "training/loss.py": """
        import torch
        from torch_utils import persistence

        @persistence.persistent_class
        class EDMLoss:
            def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
                self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
    """,
    "training/augment.py": """
        import torch
        from torch_utils import persistence
        from torch_utils import misc

        @persistence.persistent_class
        class AugmentPipe(torch.nn.Module):
            def __init__(self, p=0.12):
                super().__init__()
                self.p = float(p)
    """,
    "training/needs_stats.py": """
        import torch
        from torch_utils import persistence
        from torch_utils import training_stats

        @persistence.persistent_class
        class Net(torch.nn.Module):
            pass
    """,
    "write_pickles.py": """
        import pickle
        import sys

        import torch

        import dnnlib
        from training import augment, loss, needs_stats, networks

        torch.manual_seed(0)
        out = sys.argv[1]
        x = torch.randn(3, 2, 8, 8)
        sigma = torch.tensor([0.01, 1.0, 40.0])
        labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).float()

        def snapshot(net):
            return dict(ema=net.eval().requires_grad_(False), loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(),
                        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", resolution=8))

        uncond = networks.EDMPrecond(img_resolution=8, img_channels=2)
        cond = networks.EDMPrecond(img_resolution=8, img_channels=2, label_dim=3, sigma_min=0.01, sigma_max=50.0)
        files = {"network-snapshot-uncond.pkl": snapshot(uncond), "network-snapshot-cond.pkl": snapshot(cond),
                 "not-a-network.pkl": dict(ema=loss.EDMLoss()), "needs-stats.pkl": dict(ema=needs_stats.Net())}
        for name, data in files.items():
            with open(f"{out}/{name}", "wb") as f:
                pickle.dump(data, f)
        with torch.no_grad():
            expected = dict(x=x, sigma=sigma, labels=labels, uncond=uncond(x, sigma), cond=cond(x, sigma, labels))
        torch.save(expected, f"{out}/expected.pt")
    """,
}



@pytest.fixture
def trusted_checkpoint_code(monkeypatch):
    """These release-format pickles embed their source: load them with the opt-in."""
    monkeypatch.setenv("LD3_TRUST_CHECKPOINT_CODE", "1")


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """Release-format pickles written by a separate Python process with its own torch_utils/dnnlib."""
    writer = tmp_path_factory.mktemp("edm_writer")
    out = tmp_path_factory.mktemp("edm_pickles")
    for name, text in WRITER_PACKAGES.items():
        (writer / name).parent.mkdir(parents=True, exist_ok=True)
        (writer / name).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "write_pickles.py", str(out)], cwd=writer, check=True, timeout=120)
    return out


def test_release_format_loads_without_torch_utils_and_denoises(pickles):
    net = load_edm_network(pickles / "network-snapshot-uncond.pkl")
    assert not any(name.partition(".")[0] in ("torch_utils", "dnnlib", "training") for name in sys.modules)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    expected = torch.load(pickles / "expected.pt")
    denoiser = EDMDenoiser(net)
    assert denoiser.shape == (2, 8, 8) and denoiser.condition_kind is None
    assert (denoiser.schedule.sigma_min, denoiser.schedule.sigma_max) == (0.002, 80.0)
    with torch.no_grad():
        out = denoiser(expected["x"], expected["sigma"])
    torch.testing.assert_close(out, expected["uncond"], rtol=0, atol=0)


def test_class_conditional_network_takes_ids_or_one_hot_labels(pickles):
    expected = torch.load(pickles / "expected.pt")
    denoiser = load_edm_denoiser(pickles / "network-snapshot-cond.pkl")
    assert denoiser.condition_kind == "class" and denoiser.label_dim == 3
    assert (denoiser.schedule.sigma_min, denoiser.schedule.sigma_max) == (0.01, 50.0)  # clipped to the net's range
    x, sigma = expected["x"], expected["sigma"]
    with torch.no_grad():
        by_id = denoiser(x, sigma, torch.tensor([0, 2, 1]))
        by_label = denoiser(x, sigma, expected["labels"])
        broadcast = denoiser(x, sigma, torch.tensor([2]))
        per_sample = denoiser(x, sigma, torch.tensor([2, 2, 2]))
    torch.testing.assert_close(by_id, expected["cond"], rtol=0, atol=0)
    torch.testing.assert_close(by_label, expected["cond"], rtol=0, atol=0)
    torch.testing.assert_close(broadcast, per_sample)
    with pytest.raises(ValueError, match="class-conditional"):
        denoiser(x, sigma)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        denoiser(x, sigma, torch.tensor([0, 3, 1]))


def test_loaded_network_can_be_copied_and_pickled_again(pickles):
    net = load_edm_network(pickles / "network-snapshot-cond.pkl")
    expected = torch.load(pickles / "expected.pt")
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        with torch.no_grad():
            out = clone(expected["x"], expected["sigma"], expected["labels"])
        torch.testing.assert_close(out, expected["cond"], rtol=0, atol=0)


def test_embedded_code_that_is_not_a_network_is_rejected(pickles):
    with pytest.raises(EmbeddedCodeError, match="EDMLoss, not an EDM network"):
        load_edm_network(pickles / "not-a-network.pkl")
    with pytest.raises(EmbeddedCodeError, match="training_stats"):
        load_edm_network(pickles / "needs-stats.pkl")
    with pytest.raises(ValueError, match="key 'net'"):
        load_edm_network(pickles / "network-snapshot-uncond.pkl", key="net")


def test_missing_or_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found at .*nvlabs-fi-cdn.nvidia.com/edm/pretrained"):
        load_edm_network(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl")
    torch.save({"weight": torch.ones(2)}, tmp_path / "weights.pt")  # a zip archive, not a pickle stream
    with pytest.raises(ValueError, match="not an EDM network pickle"):
        load_edm_network(tmp_path / "weights.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="holds list"):
        load_edm_network(tmp_path / "plain.pkl")


def test_call_validation_and_memory_options(pickles):
    expected = torch.load(pickles / "expected.pt")
    plain = load_edm_denoiser(pickles / "network-snapshot-uncond.pkl")
    x, sigma = expected["x"], expected["sigma"]
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2, 8, 8\]"):
        plain(torch.zeros(3, 3, 8, 8), sigma)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, sigma, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sigma must be"):
        plain(x, sigma[:2])

    checkpointed = load_edm_denoiser(pickles / "network-snapshot-uncond.pkl", gradient_checkpointing=True)
    grads = []
    for denoiser in (plain, checkpointed):
        xg, sg = x.clone().requires_grad_(), sigma.clone().requires_grad_()
        denoiser(xg, sg).square().sum().backward()
        grads.append((xg.grad, sg.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][1].abs().min() > 0  # differentiable in sigma

    bf16 = load_edm_denoiser(pickles / "network-snapshot-uncond.pkl", autocast_bf16=True)
    with torch.no_grad():
        out = bf16(x.double(), sigma.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected["uncond"], rtol=0.05, atol=0.05)
