"""FID: distance against scipy, the Inception feature path with random weights, split-invariant statistics,
reference statistics (npz and image folders, cached) and bad input."""

import math
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from ld3.fid import (
    FEATURE_DIM,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    FeatureStats,
    FeatureStatsAccumulator,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    _tf_avg_pool,
    fid_from_stats,
    inception_weights_path,
    load_inception,
    load_stats,
    reference_stats,
    to_uint8,
)
from ld3.losses import MissingWeightsError
from ld3.metrics import frechet_distance


def scipy_frechet(mu1, cov1, mu2, cov2) -> float:
    """Textbook FID formula with scipy's general matrix square root (independent of ld3.metrics)."""
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root))


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing + shift).float()


def accumulate(features: torch.Tensor, splits: list[int]) -> FeatureStats:
    parts = []
    for chunk in torch.split(features, splits):
        acc = FeatureStatsAccumulator(features.shape[1])
        acc.update(chunk)
        parts.append(acc)
    return FeatureStatsAccumulator.combine(parts).stats()


@pytest.fixture(scope="module")
def random_inception() -> FIDInceptionV3:
    """The FID network with He-initialised convolutions so that random features are O(1), not vanishing."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.eval()


@pytest.fixture(scope="module")
def weights_file(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / STATE_DICT_FILE
    torch.save(random_inception.state_dict(), path)
    return path


# --- Fréchet distance -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_matches_scipy_on_random_gaussians(dim):
    g = torch.Generator().manual_seed(dim)
    a, b = (torch.randn(dim, dim, generator=g, dtype=torch.float64) for _ in range(2))
    cov1, cov2 = a @ a.T / dim + 0.01 * torch.eye(dim), b @ b.T / dim + 0.01 * torch.eye(dim)
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    expected = scipy_frechet(mu1.numpy(), cov1.numpy(), mu2.numpy(), cov2.numpy())
    assert math.isclose(frechet_distance(mu1, cov1, mu2, cov2), expected, rel_tol=1e-9)


def test_fid_from_accumulated_stats_matches_numpy_moments_and_scipy():
    """The streaming statistics are np.mean / np.cov (n - 1) of the features, and the FID is scipy's."""
    x, y = gaussian_features(400, 32, seed=1), gaussian_features(300, 32, seed=2, shift=0.3)
    sx, sy = accumulate(x, [400]), accumulate(y, [300])
    xn, yn = x.double().numpy(), y.double().numpy()
    np.testing.assert_allclose(sx.mu.numpy(), xn.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sx.sigma.numpy(), np.cov(xn, rowvar=False), rtol=1e-10, atol=1e-13)
    expected = scipy_frechet(xn.mean(0), np.cov(xn, rowvar=False), yn.mean(0), np.cov(yn, rowvar=False))
    assert math.isclose(fid_from_stats(sx, sy), expected, rel_tol=1e-8)
    assert sx.n == 400 and sx.sigma.dtype == torch.float64


# --- Streaming statistics ----------------------------------------------------------------------------


def test_statistics_do_not_depend_on_how_samples_are_split():
    features = gaussian_features(500, 24, seed=3, shift=0.5)
    reference = gaussian_features(500, 24, seed=4)
    ref_stats = accumulate(reference, [500])
    whole = accumulate(features, [500])
    for splits in ([250, 250], [1, 99, 400], [7, 93, 150, 50, 200]):
        split = accumulate(features, splits)
        assert split.n == whole.n == 500
        torch.testing.assert_close(split.mu, whole.mu, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(split.sigma, whole.sigma, rtol=1e-12, atol=1e-14)
        assert fid_from_stats(split, ref_stats) == pytest.approx(fid_from_stats(whole, ref_stats), rel=1e-10)


def test_accumulator_survives_pickling_and_combines_empty_parts():
    import pickle

    features = gaussian_features(50, 6, seed=5)
    acc = FeatureStatsAccumulator(6)
    acc.update(features)
    restored = pickle.loads(pickle.dumps(acc))
    combined = FeatureStatsAccumulator.combine([FeatureStatsAccumulator(6), restored])
    torch.testing.assert_close(combined.stats().sigma, acc.stats().sigma, rtol=0, atol=0)


def test_fewer_samples_than_dimensions_warns():
    acc = FeatureStatsAccumulator(FEATURE_DIM)
    acc.update(torch.randn(10, FEATURE_DIM))
    with pytest.warns(UserWarning, match="10 samples of 2048-d features is unreliable"):
        acc.stats()


# --- Feature extraction with random weights through the real loader ----------------------------------


def test_tf_average_pool_ignores_padding():
    ones = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(_tf_avg_pool(ones), ones)  # torchvision's pool would give 4/9 in the corners


def test_to_uint8_quantises_like_png_and_repeats_grey():
    values = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5)
    pixels = to_uint8(values)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 1, 5)
    assert pixels[0, 0, 0].tolist() == [0, 0, 128, 255, 255] and bool((pixels[0, 2] == pixels[0, 0]).all())


def test_state_dict_has_the_pytorch_fid_layout(random_inception):
    state = random_inception.state_dict()
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(key.startswith("AuxLogits") for key in state)


def test_feature_path_from_saved_random_weights(weights_file, random_inception):
    extractor = load_inception(weights_file)
    assert not extractor.torchscript and extractor.weights_name == STATE_DICT_FILE
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = extractor(images)
    assert features.shape == (2, FEATURE_DIM) and features.dtype == torch.float32
    assert bool(torch.isfinite(features).all()) and features.std() > 1e-3
    assert not torch.allclose(features[0], features[1])
    torch.testing.assert_close(extractor(to_uint8(images)), features)  # floats are quantised like PNGs
    # same weights as the in-memory network, applied after the reference preprocessing
    x = torch.nn.functional.interpolate(to_uint8(images).float() / 127.5 - 1, size=(299, 299), mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(features, random_inception(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates TorchScript
def test_torchscript_file_is_called_with_uint8_and_return_features(tmp_path):
    class ScriptedStandIn(nn.Module):  # the interface of NVIDIA's inception-2015-12-05.pt
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and return_features
            return x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / TORCHSCRIPT_FILE
    torch.jit.save(torch.jit.script(ScriptedStandIn()), str(path))
    extractor = load_inception(path)
    assert extractor.torchscript
    images = torch.full((2, 3, 8, 8), 0.5)
    torch.testing.assert_close(extractor(images), torch.full((2, 2048), float(to_uint8(images)[0, 0, 0, 0])))


def test_weights_are_found_in_the_torch_hub_cache(weights_file, tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / STATE_DICT_FILE).symlink_to(weights_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert inception_weights_path() == checkpoints / STATE_DICT_FILE


# --- Reference statistics ---------------------------------------------------------------------------


def test_edm_style_npz_round_trip(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # EDM's fid-refs files hold exactly these two arrays
    stats = load_stats(tmp_path / "ref.npz", dim=4)
    assert stats.n is None and stats.image_size is None and stats.sigma.dtype == torch.float64
    np.testing.assert_array_equal(stats.mu.numpy(), mu)
    saved = FeatureStats(stats.mu, stats.sigma, n=10, image_size=(32, 32)).save(tmp_path / "sub" / "copy.npz")
    again = load_stats(saved, dim=4)
    assert again.n == 10 and again.image_size == (32, 32)
    assert fid_from_stats(again, stats) == pytest.approx(0.0, abs=1e-12)


def write_pngs(folder, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def cheap_extractor(seed: int) -> InceptionFeatureExtractor:
    """The extractor wrapper around a tiny stand-in for Inception: same input handling, 2048-d output."""
    torch.manual_seed(seed)
    return InceptionFeatureExtractor(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, FEATURE_DIM)),
                                     torchscript=False, weights_name="stand-in.pth")


@pytest.mark.filterwarnings("ignore:FID from 3 samples:UserWarning")
def test_reference_stats_from_a_folder_are_cached(tmp_path):
    write_pngs(tmp_path / "real", 3, 16, seed=0)
    extractor = cheap_extractor(seed=0)
    cache = tmp_path / "cache"
    stats = reference_stats(tmp_path / "real", extractor, cache_dir=cache, batch_size=2)
    assert stats.n == 3 and stats.image_size == (16, 16) and stats.dim == FEATURE_DIM
    assert len(list(cache.glob("real-*.npz"))) == 1
    # the same images fed by hand give the same statistics
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                          for p in sorted((tmp_path / "real").glob("*.png"))])
    acc = FeatureStatsAccumulator()
    acc.add_images(images, extractor)
    torch.testing.assert_close(acc.stats().sigma, stats.sigma)
    # a second call loads the cache: another network under the same weights name is not run
    other = cheap_extractor(seed=1)
    torch.testing.assert_close(reference_stats(tmp_path / "real", other, cache_dir=cache).sigma, stats.sigma)
    assert not torch.allclose(reference_stats(tmp_path / "real", other, cache_dir=tmp_path / "new").sigma, stats.sigma)
    # a zip of the same images gives the same statistics
    with zipfile.ZipFile(tmp_path / "real.zip", "w") as archive:
        for p in sorted((tmp_path / "real").glob("*.png")):
            archive.write(p, p.name)
    zipped = reference_stats(tmp_path / "real.zip", extractor, cache_dir=tmp_path / "cache2")
    torch.testing.assert_close(zipped.mu, stats.mu)


# --- Bad input ----------------------------------------------------------------------------------------


def test_missing_weights_name_file_place_and_source(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        load_inception()
    message = str(err.value)
    assert STATE_DICT_FILE in message and TORCHSCRIPT_FILE in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "https://" in message


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit the FID Inception-v3"):
        load_inception(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_inception(tmp_path / "garbage.pth")


def test_missing_and_ill_formed_stats(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz.*reference_stats"):
        load_stats(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_stats(tmp_path / "text.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks array\(s\) \['sigma'\]"):
        load_stats(tmp_path / "no_sigma.npz", dim=3)
    np.savez(tmp_path / "bad_shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="sigma has shape"):
        load_stats(tmp_path / "bad_shape.npz", dim=3)
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        load_stats(tmp_path / "nan.npz", dim=3)


def test_stats_of_wrong_dimension_or_resolution(tmp_path):
    np.savez(tmp_path / "pool_64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="feature dimension 64, expected 2048"):
        load_stats(tmp_path / "pool_64.npz")
    small = FeatureStats(torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64))
    big = FeatureStats(torch.zeros(FEATURE_DIM, dtype=torch.float64), torch.eye(FEATURE_DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="feature dimension 64 but reference has 2048"):
        fid_from_stats(small, big)
    at32 = FeatureStats(small.mu, small.sigma, 100, (32, 32))
    at64 = FeatureStats(small.mu, small.sigma, 100, (64, 64))
    with pytest.raises(ValueError, match=r"\(32, 32\) but the reference .* \(64, 64\)"):
        fid_from_stats(at32, at64)


def test_bad_features_and_images():
    acc = FeatureStatsAccumulator(8)
    with pytest.raises(ValueError, match=r"features must have shape \[N, 8\]"):
        acc.update(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.stats()
    with pytest.raises(ValueError, match="cannot combine"):
        FeatureStatsAccumulator.combine([acc, FeatureStatsAccumulator(4)])
    with pytest.raises(ValueError, match=r"images must have shape \[N, 1 or 3, H, W\]"):
        to_uint8(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        to_uint8(torch.full((1, 3, 4, 4), float("inf")))
    identity = nn.Flatten()
    acc3 = FeatureStatsAccumulator(3 * 2 * 2)
    acc3.add_images(torch.zeros(2, 3, 2, 2), identity)
    with pytest.raises(ValueError, match="resolution"):
        acc3.add_images(torch.zeros(2, 3, 4, 4), lambda x: x[:, :, :2, :2].flatten(1))


def test_reference_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .npz file, a folder nor a .zip"):
        reference_stats(tmp_path / "nowhere")
    write_pngs(tmp_path / "mixed", 2, 8, seed=1)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(ValueError, match="extractor is required"):
        reference_stats(tmp_path / "mixed")
    with pytest.raises(ValueError, match="odd.png .* must share one resolution"):
        reference_stats(tmp_path / "mixed", cheap_extractor(seed=0), cache_dir=tmp_path / "c")
