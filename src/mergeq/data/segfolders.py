"""Semantic segmentation data sets read from a user-given path, in their own layouts (no downloads).

Each function returns a lazy :class:`SegmentationFolder` of ``(image float32 [3, H, W], label int64
[H, W])`` items whose labels are the 19 Cityscapes train ids (:data:`CITYSCAPES_CLASSES`), 255 =
ignore:

* :func:`cityscapes`: ``<root>/leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png`` with
  ``<root>/gtFine/<split>/<city>/<frame>_gtFine_labelTrainIds.png`` (mmseg's converted form, read as
  train ids) or else ``..._gtFine_labelIds.png`` (mapped by :data:`CITYSCAPES_LABEL_TO_TRAIN`, the
  ``trainId`` column of cityscapesScripts' ``helpers/labels.py``).
* :func:`gta5`: ``<root>/images/<n>.png`` with ``<root>/labels/<n>_labelTrainIds.png`` (HRDA's
  ``tools/convert_datasets/gta.py`` output) or else ``<root>/labels/<n>.png`` (palette PNGs of
  Cityscapes label ids, mapped as Cityscapes).
* :func:`idd`: ``<root>/leftImg8bit/<split>/<seq>/<frame>_leftImg8bit.{png,jpg}`` with
  ``<root>/gtFine/<split>/<seq>/<frame>_gtFine_labelids_labelTrainIds.png`` (HDRQ's
  ``tools/convert_datasets/idd.py`` output; its ``IDDDataset`` reads these with ``.jpg`` images) or
  else ``..._gtFine_labelids.png``, which AutoNUE's ``preperation/createLabels.py --id-type id``
  writes (``_polygons.json`` -> ``_label{id_type}s.png``), mapped by :data:`IDD_ID_TO_TRAIN`: the
  ``csTrainId`` column of AutoNUE's ``helpers/anue_labels.py`` over the 0-39 ``id`` column, which
  HDRQ's ``tools/convert_datasets/idd_labels.py`` copies (both checked). createLabels' default
  ``--id-type level3Id`` writes ``_gtFine_labellevel3Ids.png``, another id column: refused with a
  hint.
* :func:`image_label_pair`: any ``<images>/<stem>.<ext>`` with ``<labels>/<stem>.png``, labels in
  train ids already, or mapped by a given ``table`` (id -> train id).

Label PNGs must be one channel of class ids (``L``, ``P``, 16-bit ``I;16``); a palette image is
read as its indices. Every id without a train id (unknown values included) becomes 255
(:func:`map_labels`). With ``size=(H, W)`` the image is resized bilinearly and the label by nearest
neighbour to that size (a label whose size differs from its image's is then accepted, as mmseg's
``Resize`` does for the few such GTA5 pairs; without ``size`` it is an error naming the files).
``resize_labels=False`` keeps labels at their own resolution (mmseg's evaluation protocol:
``eval.segmentation.mean_iou`` upsamples the logits to the label). ``crop=(h, w)`` takes a random
crop (mmseg's ``RandomCrop`` without its ``cat_max_ratio`` retries), padded bottom / right with
image 0 and label 255 where the image is smaller (mmseg's ``Pad``); its offset is drawn from
``numpy.random.default_rng([seed, index, epoch])``, so it is deterministic and changes with
:meth:`SegmentationFolder.set_epoch`. Normalisation as :func:`mergeq.data.folder.normalizer`
(ImageNet mean / std by default).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import IMAGE_EXTENSIONS, FolderDataError, FolderNotFoundError, normalizer, read_image

IGNORE_INDEX = 255
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IDD_ID_TO_TRAIN = {0: 0, 3: 1, 29: 2, 20: 3, 21: 4, 26: 5, 25: 6, 24: 7, 32: 8, 5: 9, 33: 10, 6: 11, 8: 12,
                   12: 13, 13: 14, 14: 15, 17: 16, 9: 17, 10: 18}
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def lookup_table(table: Mapping[int, int]) -> np.ndarray:
    """``table`` (id -> train id) as a uint8 LUT covering at least 0..255, 255 for every other id."""
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in table):
        raise ValueError(f"label table keys must be non-negative integer ids, got {sorted(table, key=str)[:8]}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 255 for v in table.values()):
        raise ValueError("label table values must be train ids in [0, 255]")
    lut = np.full(max(256, max(table, default=0) + 1), IGNORE_INDEX, dtype=np.uint8)
    for k, v in table.items():
        lut[k] = v
    return lut


def map_labels(label_array, table: Mapping[int, int] | np.ndarray) -> np.ndarray:
    """Map an integer label array through ``table`` (a mapping or a :func:`lookup_table` LUT):
    a uint8 array of the same shape, ids not in the table (negative or large ones too) -> 255."""
    arr = np.asarray(label_array)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"label array must hold integer ids, got dtype {arr.dtype}")
    lut = table if isinstance(table, np.ndarray) else lookup_table(table)
    if arr.dtype == np.uint8:
        return lut[arr]
    out = np.full(arr.shape, IGNORE_INDEX, dtype=np.uint8)
    known = (arr >= 0) & (arr < len(lut))
    out[known] = lut[arr[known]]
    return out


_CITYSCAPES_LUT = lookup_table(CITYSCAPES_LABEL_TO_TRAIN)
_IDD_LUT = lookup_table(IDD_ID_TO_TRAIN)


def train_id_table(num_classes: int = len(CITYSCAPES_CLASSES)) -> np.ndarray:
    """The LUT of labels already in train ids: 0..num_classes-1 kept, anything else 255."""
    return lookup_table({k: k for k in range(num_classes)})


def read_label(path: str | Path) -> np.ndarray:
    """The class ids of a one-channel label image (palette images: their indices), H x W."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
                ids = np.asarray(im) if mode in _LABEL_MODES else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FolderDataError(f"cannot read label file {path}: {e}") from None
    if ids is None:
        raise FolderDataError(f"label file {path} is a {mode} image; expected one channel of class ids "
                              "(an 8-bit grey 'L' or palette 'P' PNG)")
    return ids


def _pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"{what} must be (height, width) in positive pixels or None, got {value!r}")
    return int(value[0]), int(value[1])


class SegmentationFolder(Dataset):
    """Lazy image / label-map pairs: ``dataset[i]`` decodes ``samples[i] = (image, label)``, maps the
    label through its LUT and applies the resize / crop / normalisation of the module docstring."""

    def __init__(self, samples: Sequence[tuple[Path, Path]], tables: Sequence[np.ndarray],
                 classes: Sequence[str] = CITYSCAPES_CLASSES, size: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = None, seed: int = 0, normalize: str = "imagenet",
                 resize_labels: bool = True) -> None:
        if len(samples) != len(tables):
            raise ValueError(f"{len(samples)} samples but {len(tables)} label tables")
        if not samples:
            raise FolderDataError("a segmentation data set needs at least one image / label pair")
        self.samples = [(Path(i), Path(lab)) for i, lab in samples]
        self.tables, self.classes = list(tables), list(classes)
        self.size, self.crop = _pair(size, "size"), _pair(crop, "crop")
        if crop is not None and not resize_labels:
            raise ValueError("crop needs resize_labels=True (image and label must share one grid)")
        self.seed, self.epoch, self.resize_labels = seed, 0, resize_labels
        self.normalize = normalizer(normalize)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw other random crops (the same ones again for the same epoch and seed)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        i = range(len(self))[i]  # negative indices as a list's; IndexError past the end
        image_path, label_path = self.samples[i]
        img = read_image(image_path)
        label = map_labels(read_label(label_path), self.tables[i])
        if self.size is None and label.shape != (img.height, img.width):
            raise FolderDataError(f"label file {label_path} is {label.shape[1]} x {label.shape[0]} px but its "
                                  f"image {image_path} is {img.width} x {img.height}; pass size=(H, W) to resize both")
        if self.size is not None:
            h, w = self.size
            img = img.resize((w, h), getattr(Image, "Resampling", Image).BILINEAR)
            if self.resize_labels:
                label = np.asarray(Image.fromarray(label).resize((w, h), getattr(Image, "Resampling", Image).NEAREST))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        x = self.normalize(pixels[None].float().div_(255.0))[0]
        y = torch.from_numpy(label.astype(np.int64))
        return self._crop(x, y, i) if self.crop is not None else (x, y)

    def _crop(self, x: torch.Tensor, y: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.crop
        h, w = y.shape
        if h < ch or w < cw:  # mmseg's Pad: bottom / right, image 0, label 255
            x = torch.nn.functional.pad(x, (0, max(cw - w, 0), 0, max(ch - h, 0)), value=0.0)
            y = torch.nn.functional.pad(y, (0, max(cw - w, 0), 0, max(ch - h, 0)), value=IGNORE_INDEX)
            h, w = y.shape
        rng = np.random.default_rng([self.seed, i, self.epoch])
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]

    def take_batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[N, 3, H, W]`` and labels ``[N, H, W]`` of items ``idx`` (``data_utils.take``)."""
        items = [(int(i), self[int(i)]) for i in idx]
        if not items:
            raise ValueError("take_batch needs at least one index")
        first, (x0, y0) = items[0]
        for i, (x, y) in items[1:]:
            if x.shape != x0.shape or y.shape != y0.shape:
                raise FolderDataError(
                    f"items {first} ({self.samples[first][0]}, {tuple(x0.shape[1:])}) and {i} ({self.samples[i][0]}, "
                    f"{tuple(x.shape[1:])}) differ in size and cannot form a batch; pass size=(H, W) or crop=(h, w)")
        return torch.stack([x for _, (x, _) in items]), torch.stack([y for _, (_, y) in items])


def _root(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FolderNotFoundError(f"{what} root {root} does not exist or is not a folder")
    return root


def _folder(root: Path, rel: str, what: str, expected: str) -> Path:
    folder = root / rel
    if not folder.is_dir():
        raise FolderNotFoundError(f"{what} root {root}: expected {expected}, found no such folder {folder}")
    return folder


def _check_split(split: str) -> str:
    if not isinstance(split, str) or split in ("", ".", "..") or any(c in split for c in "/\\\0"):
        raise FolderDataError(f"split {split!r} must be one folder name such as 'train' or 'val'")
    return split


def _find_label(image: Path, candidates: Sequence[tuple[Path, np.ndarray]], what: str,
                hint: str = "") -> tuple[Path, np.ndarray]:
    for path, lut in candidates:
        if path.is_file():
            return path, lut
    names = " or ".join(str(p) for p, _ in candidates)
    raise FolderDataError(f"{what} image {image} has no label: expected {names}{hint}")


def _city_layout(root: Path, split: str, what: str, suffixes: tuple[str, ...],
                 labels: Sequence[tuple[str, np.ndarray]], options: dict, hint=None) -> SegmentationFolder:
    """``leftImg8bit/<split>/<dir>/<frame>_leftImg8bit.<ext>`` paired with the first existing
    ``gtFine/<split>/<dir>/<frame><suffix>`` of ``labels`` (suffix, LUT)."""
    split = _check_split(split)
    expected = f"leftImg8bit/{split}/<city>/*_leftImg8bit{suffixes[0]}"
    images_dir = _folder(root, f"leftImg8bit/{split}", what, expected)
    images = sorted(p for s in suffixes for p in images_dir.glob(f"*/*_leftImg8bit{s}"))
    if not images:
        raise FolderNotFoundError(f"{what} root {root}: expected {expected}, found none in {images_dir}")
    labels_dir = _folder(root, f"gtFine/{split}", what, f"gtFine/{split}/<city>/*{labels[-1][0]}")
    samples, tables = [], []
    for image in images:
        frame = image.name[: -len("_leftImg8bit" + image.suffix)]
        base = labels_dir / image.parent.name
        cands = [(base / f"{frame}{suffix}", lut) for suffix, lut in labels]
        label, lut = _find_label(image, cands, what, hint(base, frame) if hint else "")
        samples.append((image, label))
        tables.append(lut)
    return SegmentationFolder(samples, tables, **options)


def cityscapes(root: str | Path, split: str = "val", size: tuple[int, int] | None = None,
               crop: tuple[int, int] | None = None, **kwargs) -> SegmentationFolder:
    """Cityscapes ``split`` under ``root`` (module docstring); ``kwargs``: the rest of
    :class:`SegmentationFolder` (``seed``, ``normalize``, ``resize_labels``)."""
    root = _root(root, "Cityscapes")
    labels = [("_gtFine_labelTrainIds.png", train_id_table()), ("_gtFine_labelIds.png", _CITYSCAPES_LUT)]
    return _city_layout(root, split, "Cityscapes", (".png",), labels, {"size": size, "crop": crop, **kwargs})


def _idd_hint(base: Path, frame: str) -> str:
    level3 = base / f"{frame}_gtFine_labellevel3Ids.png"
    if level3.is_file():
        return (f"; found {level3.name}, level3Id labels (createLabels.py's default); make the id-column labels "
                "with AutoNUE's createLabels.py --id-type id")
    return ""


def idd(root: str | Path, split: str = "val", size: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None, **kwargs) -> SegmentationFolder:
    """IDD segmentation ``split`` under ``root`` (module docstring), PNG or JPEG images."""
    root = _root(root, "IDD")
    labels = [("_gtFine_labelids_labelTrainIds.png", train_id_table()), ("_gtFine_labelids.png", _IDD_LUT)]
    return _city_layout(root, split, "IDD", (".png", ".jpg"), labels, {"size": size, "crop": crop, **kwargs},
                        _idd_hint)


def _names(split_file: str | Path) -> list[str]:
    path = Path(split_file).expanduser()
    if not path.is_file():
        raise FolderNotFoundError(f"split file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise FolderDataError(f"split file {path} lists no image")
    for n in names:
        if n in (".", "..") or any(c in n for c in "/\\\0"):
            raise FolderDataError(f"split file {path} names {n!r}; expected image file names inside images/")
    return names


def gta5(root: str | Path, size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
         split_file: str | Path | None = None, **kwargs) -> SegmentationFolder:
    """GTA5 under ``root`` (module docstring): every ``images/*.png``, or those named in ``split_file``
    (one image name per line, ``00001`` or ``00001.png``; ``#`` starts a comment line)."""
    root = _root(root, "GTA5")
    images_dir = _folder(root, "images", "GTA5", "images/<n>.png")
    labels_dir = _folder(root, "labels", "GTA5", "labels/<n>.png")
    if split_file is None:
        images = sorted(images_dir.glob("*.png"))
        if not images:
            raise FolderNotFoundError(f"GTA5 root {root}: expected images/<n>.png, found none in {images_dir}")
    else:
        images = [images_dir / (n if n.endswith(".png") else f"{n}.png") for n in _names(split_file)]
        for image in images:
            if not image.is_file():
                raise FolderNotFoundError(f"GTA5 image {image} named in split file {split_file} does not exist")
    samples, tables = [], []
    for image in images:
        cands = [(labels_dir / f"{image.stem}_labelTrainIds.png", train_id_table()),
                 (labels_dir / image.name, _CITYSCAPES_LUT)]
        label, lut = _find_label(image, cands, "GTA5")
        samples.append((image, label))
        tables.append(lut)
    return SegmentationFolder(samples, tables, size=size, crop=crop, **kwargs)


def _by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in extensions)
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise FolderDataError(f"{out[p.stem]} and {p} share the stem {p.stem!r}; one file per stem expected")
        out[p.stem] = p
    return out


def image_label_pair(images: str | Path, labels: str | Path, table: Mapping[int, int] | None = None,
                     classes: Sequence[str] = CITYSCAPES_CLASSES, size: tuple[int, int] | None = None,
                     crop: tuple[int, int] | None = None, **kwargs) -> SegmentationFolder:
    """Images in ``images`` paired by file stem with label PNGs in ``labels`` (flat folders); labels
    are train ids ``0..len(classes)-1`` (others -> 255) unless ``table`` maps their ids."""
    images_dir, labels_dir = (Path(p).expanduser() for p in (images, labels))
    for folder, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not folder.is_dir():
            raise FolderNotFoundError(f"{what} folder {folder} does not exist or is not a folder")
    imgs, labs = _by_stem(images_dir, IMAGE_EXTENSIONS), _by_stem(labels_dir, (".png",))
    if not imgs:
        raise FolderNotFoundError(f"images folder {images_dir}: expected <stem>.<image extension>, found none")
    for stem, image in imgs.items():
        if stem not in labs:
            raise FolderDataError(f"image {image} has no label: expected {labels_dir / (stem + '.png')}")
    for stem, label in labs.items():
        if stem not in imgs:
            raise FolderDataError(f"label {label} has no image: expected {images_dir / stem}.<image extension>")
    lut = train_id_table(len(classes)) if table is None else lookup_table(table)
    if table is not None and int(lut[lut != IGNORE_INDEX].max(initial=0)) >= len(classes):
        raise ValueError(f"label table maps to train ids up to {int(lut[lut != IGNORE_INDEX].max())}, "
                         f"but there are {len(classes)} classes")
    samples = [(imgs[s], labs[s]) for s in imgs]
    return SegmentationFolder(samples, [lut] * len(samples), classes, size=size, crop=crop, **kwargs)
