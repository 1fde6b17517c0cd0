"""Corruption streams for continual test-time adaptation (TTAQ's setting; CoTTA's protocol).

**Corruptions.** The 15 ImageNet-C corruptions of Hendrycks & Dietterich (ICLR 2019), in their
standard order (``imagecorruptions.get_corruption_names("common")``: noise, blur, weather,
digital), computed by the ``imagecorruptions`` reference code as packaged by
``imagecorruptions-imaug`` (1.1.5, NumPy 2). Checked on 32x32 images: all 15 run and return
uint8 HxWx3 of the input's shape (the package refuses images under 32 pixels a side; ours are
exactly 32). Caveat: the package carries ImageNet-C's constants, tuned for 224x224 images,
not CIFAR-10-C's (which Hendrycks re-tuned for 32x32), so blur, pixelate and elastic
corruptions are stronger here than in CIFAR-10-C at the same severity. ``glass_blur`` is
numba-compiled (about 3 s once per process, then < 1 ms an image); ``glass_blur`` and
``impulse_noise`` take explicit seeds, the others draw from NumPy's global generator, which
we seed per corruption and restore afterwards, so a stream is a pure function of its arguments.

**Images.** The "clean test set" is the source domain's labelled test split of the embedded
digits benchmark (``mnist``: 500 images, 50 per class, 3x32x32 in [0,1]), the role CIFAR-10's
test set plays for CIFAR-10-C: the same images are corrupted once per corruption. Each image is
converted to uint8 HxWx3, corrupted, brought back to [0,1] and standardised with the project's
``standardize`` (per image and channel), as every other input of the benchmark.

**Stream.** One domain after another in the given order, no reset between them (CoTTA,
Wang et al. CVPR 2022, Sec. 4: the model adapts online to the 15 corruptions of severity 5 in
sequence). Within a domain: ``imbalance=None`` shuffles (i.i.d., class-balanced), ``"sorted"``
sorts by label (every batch nearly one class; the extreme label shift), ``"dirichlet"``
splits the domain into ``slots`` time slots and spreads each class over the slots with
proportions ~ Dir(α·1) (NOTE, Gong et al. NeurIPS 2022; RoTTA's "correlatively sampled"
stream), so at any time a few classes dominate and the others are rare. Every image is kept.

Corrupted images are cached as ``<cache_dir>/corruptions/<name>-s<severity>-<key>.npy``
(uint8, atomic write), keyed by the images' bytes, the severity, the seed and the package
version, so a stream is built once (the 15 x 500 images take about 10 s, most of it
``glass_blur``'s compilation).

``load_cifar10c`` reads real CIFAR-10-C arrays (``<folder>/<corruption>.npy``, 50,000 x 32 x 32
x 3 uint8, 10,000 images per severity 1..5 in order, plus ``labels.npy``) into the same stream
form.
"""
from __future__ import annotations

import hashlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..data_utils import take
from ..io import atomic_write_bytes
from .digits import NUM_CLASSES, standardize

log = logging.getLogger(__name__)

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
IMBALANCE = (None, "sorted", "dirichlet")
CIFAR10C_PER_SEVERITY = 10000
Stream = list[tuple[str, Dataset]]  # (domain, (image, label) items); built ones hold TensorDatasets


def check_corruptions(names: Sequence[str] | None) -> list[str]:
    """``names`` (default: all 15 in the standard order) checked against the known corruptions."""
    names = list(CORRUPTIONS if names is None else names)
    if not names:
        raise ValueError("need at least one corruption")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(CORRUPTIONS)}")
    return names


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W floats in [0,1] -> N x H x W x 3 uint8 (rounded)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images N x 3 x H x W, got shape {tuple(images.shape)}")
    x = (images.detach().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8_hwc(x: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32 in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagecorruptions-imaug")
    except PackageNotFoundError:  # pragma: no cover - the reference package under its old name
        return "imagecorruptions-" + version("imagecorruptions")


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` to every image of ``images`` (N x H x W x 3 uint8).

    Deterministic for ``seed``; NumPy's global random state is restored afterwards.
    """
    from imagecorruptions import corrupt

    name = check_corruptions([name])[0]
    severity = check_severity(severity)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected N x H x W x 3 uint8 images, got {images.dtype} {images.shape}")
    k = CORRUPTIONS.index(name)
    state = np.random.get_state()
    np.random.seed((seed * 1009 + k * 101 + severity) % 2**32)
    per_image = np.random.default_rng([seed, k, severity]).integers(2**31, size=len(images))
    out = np.empty_like(images)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, img in enumerate(images):
                kw = {"seed": int(per_image[i])} if name in ("glass_blur", "impulse_noise") else {}
                res = np.asarray(corrupt(img, severity=severity, corruption_name=name, **kw))
                if res.ndim == 2:
                    res = np.repeat(res[..., None], 3, axis=-1)
                if res.shape != img.shape:
                    raise RuntimeError(f"corruption {name!r} (severity {severity}) returned shape {res.shape} "
                                       f"for an image of shape {img.shape}")
                if res.dtype != np.uint8:  # float output: clip before casting (no wrap-around)
                    res = np.clip(np.nan_to_num(res), 0, 255).round().astype(np.uint8)
                out[i] = res
    finally:
        np.random.set_state(state)
    return out


def _cache_path(cache_dir: Path, images: np.ndarray, name: str, severity: int, seed: int) -> Path:
    h = hashlib.sha256()
    h.update(str((images.shape, name, severity, seed, _package_version())).encode())
    h.update(images.tobytes())
    return cache_dir / "corruptions" / f"{name}-s{severity}-{h.hexdigest()[:16]}.npy"


def cached_corruption(images: np.ndarray, name: str, severity: int, seed: int = 0,
                      cache_dir: str | Path | None = ".mergeq-cache") -> np.ndarray:
    """:func:`corrupt_images`, read from / written to the disk cache (``cache_dir=None``: no cache)."""
    if cache_dir is None:
        return corrupt_images(images, name, severity, seed)
    path = _cache_path(Path(cache_dir), images, name, severity, seed)
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == images.shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass
        log.warning("ignoring unreadable or stale corruption cache %s", path)
    arr = corrupt_images(images, name, severity, seed)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return arr


def stream_order(labels: torch.Tensor, imbalance: str | None, seed: int, alpha: float = 0.1,
                 slots: int = 10) -> torch.Tensor:
    """Index order of one domain: shuffled, sorted by label, or Dirichlet label shift (see module doc)."""
    if imbalance not in IMBALANCE:
        raise ValueError(f"imbalance must be one of {IMBALANCE}, got {imbalance!r}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    if imbalance is None:
        return torch.from_numpy(rng.permutation(len(y)))
    if imbalance == "sorted":
        return torch.from_numpy(np.argsort(y, kind="stable"))
    if alpha <= 0 or slots < 1:
        raise ValueError(f"dirichlet stream needs alpha > 0 and slots >= 1, got alpha={alpha}, slots={slots}")
    buckets: list[list[int]] = [[] for _ in range(slots)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(slots, alpha))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            buckets[s].extend(part.tolist())
    return torch.from_numpy(np.concatenate([rng.permutation(np.array(b, dtype=np.int64)) for b in buckets]))


def _domain_seed(seed: int, k: int) -> int:
    return seed * 7919 + k


def build_stream(labels: torch.Tensor, names: Sequence[str], corrupt_fn, imbalance: str | None, seed: int,
                 alpha: float, slots: int, normalize: Callable[[torch.Tensor], torch.Tensor] = standardize) -> Stream:
    """Corrupt (``corrupt_fn(name)`` -> N x H x W x 3 uint8), normalise and order each domain."""
    out = []
    for k, name in enumerate(names):
        x = normalize(from_uint8_hwc(corrupt_fn(name)))
        order = stream_order(labels, imbalance, _domain_seed(seed, k), alpha, slots)
        out.append((name, TensorDataset(x[order], labels[order])))
    return out


def corruption_stream(images: torch.Tensor, labels: torch.Tensor, severity: int = 5,
                      order: Sequence[str] | None = None, seed: int = 0, imbalance: str | None = None,
                      alpha: float = 0.1, slots: int = 10, cache_dir: str | Path | None = ".mergeq-cache",
                      normalize: Callable[[torch.Tensor], torch.Tensor] = standardize) -> Stream:
    """``[(corruption, TensorDataset(x, y)), ...]`` in ``order`` (default: the 15 standard ones).

    ``images``: N x 3 x H x W in [0,1] (H, W >= 32), e.g. ``load_digits_benchmark(normalize=False)
    .source.test.tensors[0]``; the returned images are corrupted, then normalised with
    ``normalize`` (default: standardised per image, as the digits benchmark's inputs are).
    """
    names = check_corruptions(order)
    severity = check_severity(severity)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need a non-empty set of images with one label each, got {len(images)} images "
                         f"and {len(labels)} labels")
    if images.dim() != 4 or images.shape[-1] < 32 or images.shape[-2] < 32:
        raise ValueError(f"corruptions need N x 3 x H x W images with H, W >= 32, got {tuple(images.shape)}")
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise ValueError("corruption_stream expects raw images in [0, 1] (load the benchmark with normalize=False)")
    raw = to_uint8_hwc(images)
    labels = labels.long().cpu()
    return build_stream(labels, names,
                        lambda n: cached_corruption(raw, n, severity, seed, cache_dir),
                        imbalance, seed, alpha, slots, normalize)


def digits_stream(severity: int = 5, order: Sequence[str] | None = None, seed: int = 0,
                  imbalance: str | None = None, cache_dir: str | Path | None = ".mergeq-cache",
                  n: int | None = None, **kw) -> Stream:
    """The corruption stream over the digits benchmark's clean source test split (500 images)."""
    from .digits import load_digits_benchmark

    x, y = load_digits_benchmark(seed=seed, targets=[], normalize=False).source.test.tensors
    if n is not None:
        x, y = x[:n], y[:n]
    return corruption_stream(x, y, severity, order, seed, imbalance, cache_dir=cache_dir, **kw)


def stream_batches(stream: Stream, batch_size: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(domain, x, y)`` batches, domain after domain; a batch never spans two domains. A domain
    is any Dataset of (image, label) items (a TensorDataset, or lazy images read batch by batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, ds in stream:
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors
            for i in range(0, len(x), batch_size):
                yield name, x[i:i + batch_size], y[i:i + batch_size]
            continue
        for i in range(0, len(ds), batch_size):
            x, y = take(ds, range(i, min(i + batch_size, len(ds))))
            if y is None:
                raise ValueError(f"stream domain {name!r} has no labels: expected (image, label) items")
            yield name, x, y


def load_cifar10c(folder: str | Path, corruptions: Sequence[str] | None = None, severity: int = 5,
                  n: int | None = None, imbalance: str | None = None, seed: int = 0,
                  normalize: str = "standardize", alpha: float = 0.1, slots: int = 10) -> Stream:
    """CIFAR-10-C (Hendrycks & Dietterich 2019) from ``folder`` as a stream, in ``corruptions`` order.

    Reads ``<folder>/<corruption>.npy`` (N x 32 x 32 x 3 uint8 with N = 5 x 10,000, severities 1..5
    in order) and ``<folder>/labels.npy``; takes the first ``n`` (default all 10,000) images of
    ``severity``. ``normalize``: ``"standardize"`` (this project's per-image standardisation) or
    ``"none"`` (floats in [0,1]). The arrays are memory-mapped: only the used slice is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10-C folder {folder} does not exist")
    names = check_corruptions(corruptions)
    severity = check_severity(severity)
    if normalize not in ("standardize", "none"):
        raise ValueError(f"normalize must be 'standardize' or 'none', got {normalize!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def load(name: str) -> np.ndarray:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10-C file {path} does not exist")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path} is not a readable .npy array: {e}") from None

    arrays = {}
    for name in names:
        arr = load(name)
        if arr.ndim != 4 or arr.shape[1:] != (32, 32, 3) or arr.dtype != np.uint8:
            raise ValueError(f"{folder / (name + '.npy')} must be N x 32 x 32 x 3 uint8, "
                             f"got {arr.dtype} {arr.shape}")
        if len(arr) == 0 or len(arr) % 5:
            raise ValueError(f"{folder / (name + '.npy')} has {len(arr)} images; expected 5 severities "
                             f"of equally many (5 x 10,000 in CIFAR-10-C)")
        arrays[name] = arr
    per = len(arrays[names[0]]) // 5
    bad = [n for n, a in arrays.items() if len(a) != 5 * per]
    if bad:
        raise ValueError(f"corruption files {bad} do not hold {5 * per} images like {names[0]}.npy")
    labels_all = load("labels")
    if labels_all.ndim != 1 or len(labels_all) not in (per, 5 * per):
        raise ValueError(f"{folder / 'labels.npy'} must be 1-D with {5 * per} (or {per}) labels, "
                         f"got shape {labels_all.shape}")
    take = per if n is None else min(n, per)
    lo = (severity - 1) * per
    y_lo = lo if len(labels_all) == 5 * per else 0
    y = torch.from_numpy(np.asarray(labels_all[y_lo:y_lo + take]).astype(np.int64))
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {int(y.min())}..{int(y.max())}")
    out = []
    for k, name in enumerate(names):
        x = from_uint8_hwc(np.array(arrays[name][lo:lo + take]))  # a writable copy of the mapped slice
        x = standardize(x) if normalize == "standardize" else x
        order = stream_order(y, imbalance, _domain_seed(seed, k), alpha, slots)
        out.append((name, TensorDataset(x[order], y[order])))
    return out
