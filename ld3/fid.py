"""FID (Heusel et al. 2017) with the TF-compatible Inception-v3 of published FIDs (the 2015-12-05 graph).

Pieces, in the order an evaluation uses them:

- ``load_inception(path=None)``: the feature network, from a local file or the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``). Two files of the same network are understood:
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's state dict, loaded into ``FIDInceptionV3``,
  built here) and ``inception-2015-12-05.pt`` (NVIDIA's TorchScript port used by StyleGAN2-ADA/EDM,
  which resizes internally the way TF does; use it to reproduce EDM-pipeline numbers exactly).
  Nothing is downloaded; a missing file raises ``MissingWeightsError`` saying where to get it.
- The extractor maps images ``[N, C, H, W]`` (uint8, or float in [-1, 1]) to 2048-d pool3 features.
  Float images are first quantised to 8 bits as when saved to PNG, since published FIDs are computed
  on 8-bit images; then, for the state-dict network, scaled to [-1, 1] and resized bilinearly to
  299x299 (pytorch-fid's convention).
- ``FeatureStatsAccumulator``: count, sum and sum of outer products in float64. Accumulators built on
  any split of the samples ``combine`` into the same statistics (up to float64 round-off), so Ray
  workers can each reduce their share.
- ``reference_stats(source)``: an EDM/pytorch-fid ``.npz`` with ``mu`` and ``sigma``, or a folder (or
  .zip) of real images whose statistics are computed once and cached (atomic write).
- ``fid_from_stats(stats, reference)``: Fréchet distance via ``ld3.metrics.frechet_distance``.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from ld3.losses import MissingWeightsError
from ld3.metrics import frechet_distance
from ld3.utils import atomic_write_bytes, user_cache_dir

FEATURE_DIM = 2048  # pool3 features of Inception-v3
INCEPTION_SIZE = 299  # input side length of the network
STATE_DICT_FILE = "pt_inception-2015-12-05-6726825d.pth"
STATE_DICT_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{STATE_DICT_FILE}"
TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
TORCHSCRIPT_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{TORCHSCRIPT_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------
# The network: torchvision's Inception-v3 with the pooling of the TF graph in four block types.


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool, stride 1, that averages only real pixels at the border, like TF's."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDInceptionA(InceptionA):
    """Mixed_5b-5d: torchvision's block with TF border handling in the pool branch."""

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class _FIDInceptionC(InceptionC):
    """Mixed_6b-6e: torchvision's block with TF border handling in the pool branch."""

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class _FIDInceptionE(InceptionE):
    """Mixed_7b (TF average pool) and Mixed_7c (the 2015-12-05 graph max-pools here)."""

    def __init__(self, in_channels: int, pool: Callable[[Tensor], Tensor]):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        stem3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(stem3x3), self.branch3x3_2b(stem3x3)], 1)
        stem3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(stem3x3dbl), self.branch3x3dbl_3b(stem3x3dbl)], 1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(Inception3):
    """Inception-v3 of the TF FID graph (1008 classes, no aux head); ``forward`` gives pool3 features.

    Parameter names match pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``. Input: float images in
    [-1, 1] of size 299x299 (``InceptionFeatureExtractor`` prepares arbitrary images).
    """

    def __init__(self):
        blocks = [BasicConv2d, _FIDInceptionA, InceptionB, _FIDInceptionC, InceptionD, InceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7b = _FIDInceptionE(1280, pool=_tf_avg_pool)
        self.Mixed_7c = _FIDInceptionE(2048, pool=_max_pool)

    def forward(self, x: Tensor) -> Tensor:
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = layer(x)
        return self.avgpool(x).flatten(1)


# --------------------------------------------------------------------------------------------------
# Loading the weights and preparing images.


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path`` if given, else the first of the two known files in the hub cache.

    Raises ``MissingWeightsError`` naming the file(s), where they were looked for and where to get them.
    """
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = [cache / STATE_DICT_FILE, cache / TORCHSCRIPT_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise MissingWeightsError(
        f"FID needs the Inception-v3 weights of the 2015-12-05 TF graph; not found at {searched} "
        f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). Download {STATE_DICT_URL} (pytorch-fid) or "
        f"{TORCHSCRIPT_URL} (NVIDIA TorchScript, as used by EDM) on a machine with internet access and put it "
        f"in {Path(torch.hub.get_dir()) / 'checkpoints'}, or pass its path explicitly."
    )


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files holding ``constants.pkl``; torch.save files hold ``data.pkl`` only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _load_state_dict_network(path: Path) -> FIDInceptionV3:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        raise ValueError(f"Inception weights {path} could not be read as a torch state dict ({err})") from None
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(
            f"Inception weights {path} do not fit the FID Inception-v3 (expected pytorch-fid's {STATE_DICT_FILE}): "
            f"{str(err).splitlines()[0]}"
        ) from None
    return net


def to_uint8(images: Tensor) -> Tensor:
    """Images ``[N, 1 or 3, H, W]`` (uint8, or float in [-1, 1]) -> uint8 RGB, quantised as when saved to PNG.

    Float values map by ``x * 127.5 + 128`` truncated and clipped to [0, 255] (EDM's image writer).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point in [-1, 1], got dtype {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or Inf; the sampler diverged")
        images = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatureExtractor(nn.Module):
    """Images ``[N, C, H, W]`` (uint8, or float in [-1, 1]) -> pool3 features ``[N, 2048]`` (float32).

    Wraps either ``FIDInceptionV3`` (inputs scaled to [-1, 1], resized bilinearly to 299 like pytorch-fid)
    or NVIDIA's TorchScript network (called with uint8 images and ``return_features=True``; it resizes
    itself). ``weights_name`` identifies the weights in cache keys.
    """

    def __init__(self, net: nn.Module, *, torchscript: bool, weights_name: str):
        super().__init__()
        self.net = net.eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.torchscript = torchscript
        self.weights_name = weights_name

    def forward(self, images: Tensor) -> Tensor:
        pixels = to_uint8(images)
        if self.torchscript:
            return self.net(pixels, return_features=True).float()
        x = pixels.float() / 127.5 - 1
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x)


def load_inception(
    path: str | os.PathLike | None = None, *, device: torch.device | str | None = None
) -> InceptionFeatureExtractor:
    """The FID feature extractor from ``path`` or the hub cache (see ``inception_weights_path``), in eval mode."""
    weights = inception_weights_path(path)
    torchscript = _is_torchscript_archive(weights)
    if torchscript:
        with warnings.catch_warnings():  # torch deprecates TorchScript; NVIDIA's file is still the reference
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            net = torch.jit.load(str(weights), map_location="cpu")
    else:
        net = _load_state_dict_network(weights)
    return InceptionFeatureExtractor(net, torchscript=torchscript, weights_name=weights.name).to(device)


# --------------------------------------------------------------------------------------------------
# Feature statistics.


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``mu`` [d] and covariance ``sigma`` [d, d] (float64) of features; ``n`` samples of ``image_size``.

    ``n`` and ``image_size`` are None when unknown (EDM's reference files store only mu and sigma).
    """

    mu: Tensor
    sigma: Tensor
    n: int | None = None
    image_size: tuple[int, int] | None = None

    @property
    def dim(self) -> int:
        return self.mu.numel()

    def save(self, path: str | os.PathLike) -> Path:
        """Write an EDM-compatible ``.npz`` (``mu``, ``sigma``; ``n``, ``image_size`` when known), atomically."""
        arrays = {"mu": self.mu.cpu().numpy(), "sigma": self.sigma.cpu().numpy()}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n)
        if self.image_size is not None:
            arrays["image_size"] = np.asarray(self.image_size)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: str | os.PathLike, *, dim: int | None = FEATURE_DIM) -> FeatureStats:
    """Statistics from an EDM/pytorch-fid ``.npz`` with arrays ``mu`` [d] and ``sigma`` [d, d].

    ``dim`` is the feature dimension the caller's extractor produces (None accepts any).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference statistics {path} not found. Use the .npz published for the dataset (e.g. EDM's "
            f"https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz) or compute it once from a folder "
            f"of real images with ld3.fid.reference_stats(folder, extractor)."
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"FID reference statistics {path} is not a readable .npz file ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"FID reference statistics {path} is a single array (.npy), not an .npz archive with arrays "
                         "mu and sigma; save them with numpy.savez(path, mu=mu, sigma=sigma)")
    with data:
        arrays = {key: data[key] for key in data.files}
    missing = {"mu", "sigma"} - arrays.keys()
    if missing:
        raise ValueError(f"FID reference statistics {path} lacks array(s) {sorted(missing)}; found {sorted(arrays)}")
    mu = torch.from_numpy(np.asarray(arrays["mu"], dtype=np.float64)).reshape(-1)
    sigma = torch.from_numpy(np.asarray(arrays["sigma"], dtype=np.float64))
    if sigma.shape != (mu.numel(), mu.numel()):
        raise ValueError(f"FID reference statistics {path}: sigma has shape {tuple(sigma.shape)}, "
                         f"expected {(mu.numel(), mu.numel())} to match mu")
    if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
        raise ValueError(f"FID reference statistics {path} contain NaN or Inf")
    if dim is not None and mu.numel() != dim:
        raise ValueError(f"FID reference statistics {path} have feature dimension {mu.numel()}, expected {dim} "
                         "(pool3 of Inception-v3); they were computed with another network or layer")
    _check_covariance(sigma, path)
    n = int(arrays["n"]) if "n" in arrays else None
    image_size = tuple(int(s) for s in arrays["image_size"]) if "image_size" in arrays else None
    return FeatureStats(mu, sigma, n, image_size)


def _check_covariance(sigma: Tensor, path: Path, rtol: float = 1e-5) -> None:
    """A covariance is symmetric positive semi-definite (eigenvalues >= -rtol * largest; rounding allowed)."""
    scale = float(sigma.abs().max()) or 1.0
    if not torch.allclose(sigma, sigma.T, rtol=0.0, atol=rtol * scale):
        raise ValueError(f"FID reference statistics {path}: sigma is not symmetric, so it is no covariance matrix")
    eigenvalues = torch.linalg.eigvalsh(sigma)
    if float(eigenvalues[0]) < -rtol * max(float(eigenvalues[-1]), 0.0) or float(eigenvalues[-1]) < 0:
        raise ValueError(f"FID reference statistics {path}: sigma is not positive semi-definite (smallest eigenvalue "
                         f"{float(eigenvalues[0]):.3g}, largest {float(eigenvalues[-1]):.3g}), so it is no covariance matrix")


def _warn_if_few_samples(n: int, dim: int) -> None:
    if n < dim:
        warnings.warn(
            f"FID from {n} samples of {dim}-d features is unreliable: the covariance is rank-deficient and the "
            "FID is biased upwards; published FIDs use 50,000 samples",
            stacklevel=3,
        )


class FeatureStatsAccumulator:
    """Streaming mean/covariance of features: count, sum and sum of outer products, all float64.

    Buffers live on the device of the first features seen; pickling (e.g. returning the accumulator
    from a Ray worker) moves them to the CPU. ``combine`` sums accumulators built on any split of the
    samples into the statistics of all of them.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        if dim < 1:
            raise ValueError(f"dim must be a positive feature dimension, got {dim}")
        self.dim = dim
        self.count = 0
        self.image_size: tuple[int, int] | None = None
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    def update(self, features: Tensor) -> None:
        """Add features ``[N, dim]``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape [N, {self.dim}], got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or Inf")
        x = features.detach().to(device=self._buffers_on(features.device), dtype=torch.float64)
        self._sum += x.sum(0)
        self._outer += x.T @ x
        self.count += x.shape[0]

    def _buffers_on(self, device: torch.device) -> torch.device:
        """Create the zero buffers on ``device`` if there are none yet; return the buffers' device."""
        if self._sum is None:
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        return self._sum.device

    def add_images(self, images: Tensor, extractor: nn.Module) -> None:
        """Extract features of ``images`` [N, C, H, W] (no grad) and add them; all images must share one size."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        self._check_image_size(size, "images")
        with torch.no_grad():
            self.update(extractor(images))
        self.image_size = size

    def _check_image_size(self, size: tuple[int, int] | None, what: str) -> None:
        if size is not None and self.image_size is not None and size != self.image_size:
            raise ValueError(f"{what} have size {size} but earlier images had {self.image_size}; "
                             "FID statistics must come from images of one resolution")

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance (n - 1) of everything added; warns when n < dim."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for FID statistics, got {self.count}")
        _warn_if_few_samples(self.count, self.dim)
        mu = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return FeatureStats(mu.cpu(), sigma.cpu(), self.count, self.image_size)

    @classmethod
    def combine(cls, accumulators: Iterable[FeatureStatsAccumulator]) -> FeatureStatsAccumulator:
        """A new accumulator (on the CPU) holding the samples of all ``accumulators``."""
        parts = list(accumulators)
        if not parts:
            raise ValueError("accumulators is empty; pass at least one FeatureStatsAccumulator")
        total = cls(parts[0].dim)
        for part in parts:
            if part.dim != total.dim:
                raise ValueError(f"cannot combine accumulators of feature dimension {part.dim} and {total.dim}")
            total._check_image_size(part.image_size, "combined accumulators")
            total.image_size = total.image_size or part.image_size
            if part._sum is None:
                continue
            total._buffers_on(torch.device("cpu"))
            total._sum += part._sum.cpu()
            total._outer += part._outer.cpu()
            total.count += part.count
        return total

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_sum", "_outer"):
            if state[key] is not None:
                state[key] = state[key].cpu()
        return state


# --------------------------------------------------------------------------------------------------
# Reference statistics and the distance.


def _image_entries(source: Path) -> list[str]:
    """Sorted image names in a folder (recursive, relative paths) or a .zip archive."""
    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    else:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    return sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))


def _read_images(source: Path, names: list[str]) -> Iterator[tuple[str, Tensor]]:
    """(name, uint8 RGB tensor [3, H, W]) for each named image of a folder or .zip archive."""
    from PIL import Image

    archive = None if source.is_dir() else zipfile.ZipFile(source)
    try:
        for name in names:
            handle = (source / name).open("rb") if archive is None else archive.open(name)
            with handle, Image.open(handle) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
            yield name, torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    finally:
        if archive is not None:
            archive.close()


def _source_digest(source: Path, names: list[str], weights_name: str) -> str:
    """Cache key of a reference set: image names and sizes, and the feature network's weights file name."""
    hasher = hashlib.sha256(f"{weights_name}\n".encode())
    if source.is_dir():
        sizes = [(source / n).stat().st_size for n in names]
    else:
        with zipfile.ZipFile(source) as archive:
            sizes = [archive.getinfo(n).file_size for n in names]
    for name, size in zip(names, sizes):
        hasher.update(f"{name}\t{size}\n".encode())
    return hasher.hexdigest()[:16]


def default_stats_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ld3/fid-refs`` (default ``~/.cache/ld3/fid-refs``)."""
    return user_cache_dir("fid-refs")


def reference_stats(
    source: str | os.PathLike,
    extractor: InceptionFeatureExtractor | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> FeatureStats:
    """Reference statistics from a ``.npz`` file, or from a folder / .zip of real images (computed once, cached).

    For images, ``extractor`` is required; the result is written atomically to ``cache_dir`` (default
    ``default_stats_cache_dir()``) under a key of the image names, file sizes and the extractor's weights
    file, and later calls load it instead of recomputing.
    """
    source = Path(source).expanduser()
    if source.suffix == ".npz":
        return load_stats(source)
    if not (source.is_dir() or zipfile.is_zipfile(source)):
        raise FileNotFoundError(f"FID reference source {source} is neither a .npz file, a folder nor a .zip of images")
    if extractor is None:
        raise ValueError(f"extractor is required to compute reference statistics from images in {source}; "
                         "pass ld3.fid.load_inception(...)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    names = _image_entries(source)
    if len(names) < 2:
        raise ValueError(f"FID reference source {source} holds {len(names)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                         "need a folder of real images")
    cache_file = Path(cache_dir or default_stats_cache_dir()) / (
        f"{source.stem}-{_source_digest(source, names, extractor.weights_name)}.npz")
    if cache_file.is_file():
        return load_stats(cache_file)
    stats = _stats_of_images(source, names, extractor, batch_size)
    stats.save(cache_file)
    return stats


def _stats_of_images(source: Path, names: list[str], extractor: nn.Module, batch_size: int) -> FeatureStats:
    device = next(extractor.parameters(), torch.empty(0)).device
    accumulator = FeatureStatsAccumulator(FEATURE_DIM)
    batch: list[Tensor] = []
    first_shape = None
    for name, image in _read_images(source, names):
        first_shape = first_shape or image.shape
        if image.shape != first_shape:
            raise ValueError(f"image {name} in {source} has size {tuple(image.shape[1:])}, others "
                             f"{tuple(first_shape[1:])}; reference images must share one resolution")
        batch.append(image)
        if len(batch) == batch_size:
            accumulator.add_images(torch.stack(batch).to(device), extractor)
            batch.clear()
    if batch:
        accumulator.add_images(torch.stack(batch).to(device), extractor)
    return accumulator.stats()


def fid_from_stats(stats: FeatureStats, reference: FeatureStats) -> float:
    """FID = Fréchet distance between the Gaussians of generated and reference features (float64)."""
    if stats.dim != reference.dim:
        raise ValueError(f"stats have feature dimension {stats.dim} but reference has {reference.dim}; "
                         "compute both with the same network")
    if stats.image_size and reference.image_size and stats.image_size != reference.image_size:
        raise ValueError(f"generated images are {stats.image_size} but the reference statistics were computed on "
                         f"{reference.image_size} images; use reference statistics of the model's resolution")
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
