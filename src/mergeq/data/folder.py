"""Image-folder benchmarks: Office-Home (or any ``<root>/<Domain>/<Class>/<image>`` tree), read lazily.

Layout (Office-Home as unpacked from ``OfficeHomeDataset_10072016.zip``)::

    <root>/Art/Alarm_Clock/00001.jpg
    <root>/Clipart/...
    <root>/Product/...
    <root>/Real World/...        # "Real_World" is accepted too

Every domain must hold the same class folders (65 in Office-Home; a domain that differs from
the source is an error naming it and the missing and extra classes); the class index is the
position of the folder name in the sorted list (as torchvision's ``ImageFolder``). Hidden
entries and files without an image extension are skipped; a class folder with no image is
an error. Images are decoded with Pillow only when an item is read (``FolderImages`` keeps
paths, never pixels), converted to RGB, resized (shorter side to ``resize``, bilinear) and
centre cropped to ``crop`` x ``crop``: 3 x crop x crop float tensors. Normalisation
(``normalize``): ``"imagenet"`` (default; (x - mean) / std with ImageNet's mean and std, what
torchvision / timm weights expect), ``"inception"`` (mean = std = 0.5, what some timm weights
expect), ``"standardize"`` (per image and channel, as the digits
benchmark: ``digits.standardize``; what ``adapt.source``'s colour jitter assumes) or ``"none"``
(values in [0, 1]). With ``augment=True`` the source's training split gets a random-resized
crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip (p = 0.5) in place of resize + centre
crop (targets' training splits are calibration data and stay unaugmented); they draw from
torch's global generator, so seed with ``torch.manual_seed`` (DataLoader workers are seeded by
the DataLoader).

Splits: each domain is split per class, seeded by ``seed`` and the domain name (a domain's
split does not depend on which other domains are loaded), into ``train`` (for the source:
labelled training images; for targets: the unlabeled adaptation / calibration data, labels
kept for diagnostics only) and ``test`` (``test_fraction`` of every class, at least one image
each side). Both are in a seeded shuffled order, so the first N images of ``train`` (what
``quantize(calib_size=N)`` takes) mix all classes. ``transductive=True`` gives targets the
protocol of SHOT and the HDRQ paper: adapt on all of a target's images and test on the same
images (the source is still split). ``Benchmark.spec`` reports the class list and, per domain,
the split sizes and a fingerprint of its files (a hash of the sorted image paths relative to
the domain folder, their sizes and the SHA-256 of their contents, whatever the seed; read once
per process while a file's size, mtime and ctime stay put): the split itself is a function of the files, ``seed``,
``test_fraction`` and ``transductive``, so the same files and settings give the same split.

Every mergeq function takes the lazy datasets as they are (a ``DataLoader`` over them works
too); ``materialize`` decodes a split into a ``TensorDataset`` once (about 0.6 MB per 224 x 224
image), which saves decoding again in every epoch. With ``cache_dir`` (every mergeq command passes
``runtime.cache_dir``) each domain's images are decoded once, in parallel, and cached as 8-bit
pixels (:mod:`mergeq.data.decoded`); the splits are then :class:`~mergeq.data.decoded.DecodedImages`
(150 KB per 224 x 224 image in memory), normalised on read, except an augmented source training
split, which stays lazy (every epoch draws new crops).
"""
from __future__ import annotations

import hashlib
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import MergeqError
from ..io import utf8_name
from .digits import BENCHMARKS, Benchmark, Domain, standardize

log = logging.getLogger(__name__)

OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
OFFICE_HOME_CLASSES = 65
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_STD = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
NORMALIZATIONS = ("imagenet", "inception", "standardize", "none")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Office-Home domain spellings (lower case, without " ", "_" and "-") -> canonical name
_OFFICE_HOME_ALIASES = {"art": "Art", "a": "Art", "clipart": "Clipart", "c": "Clipart", "product": "Product",
                        "p": "Product", "realworld": "Real_World", "real": "Real_World", "r": "Real_World"}
_OFFICE_HOME_FOLDERS = {"Real_World": ("Real_World", "Real World")}


class FolderDataError(MergeqError):
    """An image-folder data set that cannot be used: bad layout, empty class, unreadable image."""


class FolderNotFoundError(FolderDataError, FileNotFoundError):
    """A missing data root or domain folder."""


def check_name(name: str, what: str = "domain") -> str:
    """``name`` if it is one folder name that stays inside its root: not empty, not ``.`` or
    ``..``, no ``/``, ``\\`` or NUL (so no absolute path); else a FolderDataError naming it."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise FolderDataError(f"{what} name {name!r} must be one folder name inside the data root "
                              "(no '/', '\\', '..' or absolute path)")
    return name


def normalizer(normalize: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The normalisation ``normalize`` names (module docstring), for N x 3 x H x W images in [0, 1]."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if normalize == "standardize":
        return standardize
    if normalize == "none":
        return lambda x: x
    mean, std = (torch.tensor(v)[:, None, None] for v in MEAN_STD[normalize])
    return lambda x: (x - mean) / std


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised float tensor 3 x crop x crop (see the module docstring)."""

    resize: int = 256
    crop: int = 224
    augment: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    standardize: bool = False  # per image and channel (digits.standardize) instead of mean / std

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={self.crop}, resize={self.resize}")

    @classmethod
    def named(cls, normalize: str, resize: int, crop: int, augment: bool = False) -> "ImageTransform":
        """The transform for a ``normalize`` name of the module docstring."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        mean, std = MEAN_STD.get(normalize, MEAN_STD["none"])
        return cls(resize, crop, augment, mean=mean, std=std, standardize=normalize == "standardize")

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if self.augment:
            img = img if img.mode == "RGB" else img.convert("RGB")
            top, left, h, w = self._random_box(img.width, img.height)
            img = img.resize((self.crop, self.crop), _bilinear(), box=(left, top, left + w, top + h))
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT if hasattr(Image, "Transpose")
                                    else Image.FLIP_LEFT_RIGHT)
            pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        else:
            pixels = resize_crop(img, self.resize, self.crop)
        return self.normalize(torch.from_numpy(pixels.copy())[None])[0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W 8-bit pixels -> normalised float images."""
        x = pixels.float().div_(255.0)
        if self.standardize:
            return standardize(x)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def _random_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: (top, left, h, w)."""
        area = width * height
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*self.scale))
            aspect = float(torch.exp(torch.empty(()).uniform_(float(log_ratio[0]), float(log_ratio[1]))))
            w = int(round((target * aspect) ** 0.5))
            h = int(round((target / aspect) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return top, left, h, w
        in_ratio = width / height  # fallback: the largest central crop within the ratio bounds
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def _bilinear():
    from PIL import Image

    return getattr(Image, "Resampling", Image).BILINEAR


def resize_crop(img, resize: int, crop: int) -> np.ndarray:
    """RGB ``img`` with its shorter side resized to ``resize`` (bilinear), centre cropped to
    ``crop`` x ``crop``: a 3 x crop x crop uint8 array (numpy only: decode workers use no torch)."""
    from PIL import Image

    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    if Image.MAX_IMAGE_PIXELS and resize * new_long > Image.MAX_IMAGE_PIXELS:  # a long thin image
        raise FolderDataError(f"a {w} x {h} image resized to a shorter side of {resize} would hold "
                              f"{resize * new_long:,} pixels, over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}")
    img = img.resize((resize, new_long) if w <= h else (new_long, resize), _bilinear())
    top = int(round((img.height - crop) / 2.0))
    left = int(round((img.width - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class FolderImages(Dataset):
    """Lazy labelled images: ``dataset[i]`` decodes ``paths[i]`` and returns ``(image, label)``."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int], classes: Sequence[str],
                 transform: ImageTransform | None = None) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.classes = list(classes)
        self.transform = transform or ImageTransform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = read_image(self.paths[i])
        try:
            return self.transform(img), int(self.labels[i])
        except FolderDataError as e:
            raise FolderDataError(f"image {self.paths[i]}: {e}") from None

    def with_transform(self, transform: ImageTransform) -> "FolderImages":
        """The same images and labels under another transform (e.g. ``augment=True`` for training)."""
        return FolderImages(self.paths, self.labels.tolist(), self.classes, transform)


def read_image(path: str | Path):
    """Decode ``path`` with Pillow (fully loaded) into 8-bit RGB (:func:`rgb8`); a file that does not
    decode, or has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb), raises
    :class:`FolderDataError` naming the file."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FolderDataError(f"cannot read image {path}: {e}") from None


def rgb8(im):
    """A Pillow image as 8-bit RGB: 16- and 32-bit grey (modes ``I;16*`` and ``I``, 16-bit PNGs)
    scaled from 0..65535 (Pillow's own conversion clips them at 255); palette, grey, alpha and
    other modes by Pillow's conversion (alpha dropped, as torchvision's loader does)."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        grey = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0
        im = Image.fromarray(np.rint(grey).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def _verify_image(path: Path) -> None:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused as read_image refuses it
            with Image.open(path) as im:
                im.verify()
    except Exception as e:  # Pillow raises many types for broken files
        raise FolderDataError(f"cannot read image {path}: {e}") from None


def materialize(dataset: Dataset, batch_size: int = 64, num_workers: int = 0) -> TensorDataset:
    """Decode a (lazy) labelled dataset into a ``TensorDataset`` (what SHOT and source training read)."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    if not xs:
        raise FolderDataError("cannot materialize an empty dataset")
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def scan_domain(domain_dir: str | Path) -> Dict[str, list[Path]]:
    """Class folder name -> its image files (both sorted); errors on an empty domain or class."""
    domain_dir = Path(domain_dir)
    if not domain_dir.is_dir():
        raise FolderNotFoundError(f"domain folder {domain_dir} does not exist")
    utf8_name(domain_dir, "domain folder", FolderDataError)
    classes = sorted(utf8_name(p, "class folder", FolderDataError).name for p in domain_dir.iterdir()
                     if p.is_dir() and _visible(p))
    if not classes:
        raise FolderDataError(f"domain folder {domain_dir} holds no class folders (<domain>/<class>/<image>)")
    out = {}
    for c in classes:
        files = sorted(utf8_name(p, "image", FolderDataError) for p in (domain_dir / c).iterdir()
                       if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FolderDataError(f"class folder {domain_dir / c} holds no images "
                                  f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        out[c] = files
    return out


def split_indices(labels: Sequence[int], test_fraction: float, seed: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split: (train, test) indices, disjoint, each in a seeded shuffled order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise FolderDataError(f"domain {domain!r}: class {int(c)} has {len(idx)} image(s); "
                                  "a train/test split needs at least 2 per class")
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _check_same_classes(found: Mapping[str, Sequence[str]], dirs: Mapping[str, Path], reference: str) -> None:
    ref = set(found[reference])
    for name, classes in found.items():
        if set(classes) != ref:
            missing, extra = sorted(ref - set(classes)), sorted(set(classes) - ref)
            raise FolderDataError(
                f"domain {name!r} ({dirs[name]}) has different class folders from domain {reference!r}: "
                f"missing {missing}, extra {extra}; every domain needs the same class folders")


_DIGESTS: dict[tuple, bytes] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> SHA-256 of the file's bytes


def file_digest(path: Path) -> bytes:
    """SHA-256 of ``path``'s bytes, remembered in this process while its size, mtime, ctime and
    inode stay the same (a write changes ctime, which no user call can set back)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").digest()
    return _DIGESTS[key]


def _fingerprint(paths: Sequence[Path], folder: Path) -> str:
    """Hash of the domain's files: each path relative to ``folder`` (sorted), its size and the
    SHA-256 of its bytes, so changed pixels under the same names give another fingerprint."""
    h = hashlib.sha256()
    for rel, p in sorted((p.relative_to(folder).as_posix(), p) for p in paths):
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        h.update(file_digest(p))
    return h.hexdigest()[:16]


def _build(name: str, dirs: Mapping[str, Path], source: str, targets: Sequence[str], seed: int,
           test_fraction: float, transductive: bool, resize: int, crop: int, augment: bool,
           verify: bool, normalize: str, cache_dir: str | Path | None) -> Benchmark:
    scans = {d: scan_domain(p) for d, p in dirs.items()}
    _check_same_classes({d: list(s) for d, s in scans.items()}, dirs, source)
    classes = list(scans[source])
    eval_t = ImageTransform.named(normalize, resize, crop)
    train_t = ImageTransform.named(normalize, resize, crop, augment=True) if augment else eval_t
    domains, splits = {}, {}
    for d, scan in scans.items():
        paths = [p for c in classes for p in scan[c]]
        labels = [k for k, c in enumerate(classes) for _ in scan[c]]
        if verify:
            for p in paths:
                _verify_image(p)
        fingerprint = _fingerprint(paths, dirs[d])
        pixels = None if cache_dir is None else _decoded(paths, dirs[d], resize, crop, cache_dir, fingerprint,
                                                         f"{name}-{d}")
        if transductive and d != source:
            order = np.random.default_rng([seed, zlib.crc32(d.encode())]).permutation(len(paths))
            train_idx = test_idx = order
        else:
            train_idx, test_idx = split_indices(labels, test_fraction, seed, d)

        def part(idx: np.ndarray, t: ImageTransform) -> Dataset:
            if pixels is not None and not t.augment:
                from .decoded import DecodedImages

                return DecodedImages(pixels, labels, idx, t)
            return FolderImages([paths[i] for i in idx], [labels[i] for i in idx], classes, t)

        train, test = part(train_idx, train_t if d == source else eval_t), part(test_idx, eval_t)
        domains[d] = Domain(d, train, test)
        splits[d] = {"train": len(train), "test": len(test), "fingerprint": fingerprint}
    return Benchmark(name, domains[source], {t: domains[t] for t in targets}, len(classes),
                     {"classes": classes, "splits": splits})


def _decoded(paths: Sequence[Path], folder: Path, resize: int, crop: int, cache_dir: str | Path, fingerprint: str,
             name: str):
    from .decoded import decoded_pixels

    return decoded_pixels(paths, folder, resize, crop, cache_dir, fingerprint, re.sub(r"[^\w.-]", "_", name))


def _root(root: str | Path | None, what: str) -> Path:
    if root is None:
        raise FolderNotFoundError(f"{what} needs root=<folder holding one folder per domain>")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FolderNotFoundError(f"data root {root} does not exist or is not a folder")
    return root


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))


def load_folder_benchmark(root: str | Path | None = None, source: str | None = None,
                          targets: Sequence[str] | None = None, seed: int = 0, test_fraction: float = 0.2,
                          transductive: bool = False, resize: int = 256, crop: int = 224, augment: bool = False,
                          verify: bool = False, name: str = "folder", normalize: str = "imagenet",
                          cache_dir: str | Path | None = None) -> Benchmark:
    """A benchmark from ``<root>/<Domain>/<Class>/<image>``: domain names are folder names.

    ``targets`` defaults to every other domain folder. ``augment`` applies the random-resized
    crop and flip to the source's ``train`` split; ``verify`` opens every image once now
    (Pillow's header check) instead of failing on first read; ``normalize``, ``cache_dir``: see the
    module docstring.
    """
    root = _root(root, f"benchmark {name!r}")
    if source is None:
        raise ValueError(f"benchmark {name!r} needs source=<domain folder>; found {_subfolders(root)}")
    targets = [d for d in _subfolders(root) if d != source] if targets is None else list(targets)
    return _build(name, _domain_dirs(root, [source, *targets]), source, targets, seed, test_fraction,
                  transductive, resize, crop, augment, verify, normalize, cache_dir)


def _domain_dirs(root: Path, names: Sequence[str],
                 folders: Mapping[str, Sequence[str]] | None = None) -> Dict[str, Path]:
    """Domain name -> its folder (the first of ``folders[name]`` that exists, default ``name``)."""
    if len(set(names)) != len(names):
        raise ValueError(f"source and target domains must be distinct, got {list(names)}")
    out = {}
    for d in names:
        check_name(d)
        candidates = (folders or {}).get(d, (d,))
        found = [root / c for c in candidates if (root / c).is_dir()]
        if not found:
            raise FolderNotFoundError(f"domain folder {' or '.join(repr(str(root / c)) for c in candidates)} "
                                      f"does not exist; {root} holds {_subfolders(root)}")
        out[d] = found[0]
    return out


def office_home_domain(name: str) -> str:
    """Canonical Office-Home domain name for ``name`` ("Real World", "real_world", "R", "art", ...)."""
    key = name.lower().replace(" ", "").replace("_", "").replace("-", "")
    if key not in _OFFICE_HOME_ALIASES:
        raise ValueError(f"unknown Office-Home domain {name!r}; known: {', '.join(OFFICE_HOME_DOMAINS)}")
    return _OFFICE_HOME_ALIASES[key]


def load_office_home(root: str | Path | None = None, source: str = "Real_World",
                     targets: Sequence[str] | None = None, seed: int = 0, test_fraction: float = 0.2,
                     transductive: bool = False, resize: int = 256, crop: int = 224, augment: bool = False,
                     verify: bool = False, normalize: str = "imagenet",
                     cache_dir: str | Path | None = None) -> Benchmark:
    """Office-Home (Venkateswara et al., CVPR 2017) from ``root``; see the module docstring.

    Domain names are canonical (``Art``, ``Clipart``, ``Product``, ``Real_World``); aliases such
    as ``"Real World"`` or ``"R"`` are accepted. ``targets`` defaults to the three non-source domains.
    """
    root = _root(root, "benchmark 'office_home'")
    source = office_home_domain(source)
    targets = [d for d in OFFICE_HOME_DOMAINS if d != source] if targets is None else \
        [office_home_domain(t) for t in targets]
    bench = _build("office_home", _domain_dirs(root, [source, *targets], _OFFICE_HOME_FOLDERS), source, targets,
                   seed, test_fraction, transductive, resize, crop, augment, verify, normalize, cache_dir)
    if bench.num_classes != OFFICE_HOME_CLASSES:
        log.warning("Office-Home has %d classes, %s holds %d", OFFICE_HOME_CLASSES, root, bench.num_classes)
    return bench


BENCHMARKS["office_home"] = load_office_home
BENCHMARKS["folder"] = load_folder_benchmark
