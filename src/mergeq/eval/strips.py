"""Segmentations a person can look at: a few test images per target, their labels and each model's
prediction, kept in ``results.json`` and drawn as one PNG strip per target.

:func:`preview_inputs` picks the first ``n`` test images of a domain and encodes them (RGB, each
image and channel min-max scaled to 0..255) with their labels; :func:`preview` encodes a model's
per-pixel argmax on the same images. An array is stored as ``{"shape", "zlib"}`` (its uint8
bytes, zlib-compressed, base64): a 4-image 64x64 label map takes about 1 kB, so every row of a run
can carry its predictions and the strips are redrawn from ``results.json`` alone.
:func:`plot_strips` draws, per target, one column per image and one row each for the image, the
label (ignore pixels black), and every model's prediction, in Cityscapes' colours (:func:`palette`).
"""
from __future__ import annotations

import base64
import os
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data_utils import take

PREVIEW_IMAGES = 4
IGNORE_INDEX = 255
# Cityscapes' colours for its 19 classes (cityscapesScripts' label table), then distinct extras
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def encode(array: np.ndarray) -> dict:
    """A uint8 array as ``{"shape", "zlib"}`` (module docstring)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    return {"shape": list(a.shape), "zlib": base64.b64encode(zlib.compress(a.tobytes(), 9)).decode("ascii")}


def decode(blob: Mapping) -> np.ndarray:
    """The uint8 array :func:`encode` stored."""
    raw = zlib.decompress(base64.b64decode(blob["zlib"]))
    return np.frombuffer(raw, dtype=np.uint8).reshape(blob["shape"])


def _indices(data: Dataset, n: int) -> list[int]:
    return list(range(min(n, len(data))))


def preview_inputs(data: Dataset, n: int = PREVIEW_IMAGES) -> dict:
    """The first ``n`` images of ``data`` (RGB, scaled per image and channel) and their labels, encoded."""
    x, y = take(data, _indices(data, n))
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    rgb = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().clamp(0, 255).permute(0, 2, 3, 1)
    return {"images": encode(rgb.to(torch.uint8).numpy()), "labels": encode(y.to(torch.uint8).numpy())}


@torch.no_grad()
def preview(model: nn.Module, data: Dataset, device: str | torch.device = "cpu", n: int = PREVIEW_IMAGES) -> dict:
    """``model``'s per-pixel prediction on the images of :func:`preview_inputs`, encoded."""
    x = take(data, _indices(data, n))[0]
    was_training = model.training
    pred = model.eval()(x.to(device)).argmax(dim=1).cpu()
    model.train(was_training)
    return encode(pred.to(torch.uint8).numpy())


CITYSCAPES_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                    "bicycle")


def palette(classes: list[str] | None = None) -> np.ndarray:
    """One colour per class: a Cityscapes class name gets its Cityscapes colour, others the colours
    left over, in order."""
    if not classes:
        return PALETTE
    spare = [k for k, name in enumerate(CITYSCAPES_NAMES) if name not in classes]
    rows, k = [], 0
    for name in classes:
        if name in CITYSCAPES_NAMES:
            rows.append(PALETTE[CITYSCAPES_NAMES.index(name)])
        else:
            rows.append(PALETTE[spare[k % len(spare)]] if spare else PALETTE[k % len(PALETTE)])
            k += 1
    return np.stack(rows)


def colorize(labels: np.ndarray, colours: np.ndarray = PALETTE) -> np.ndarray:
    """Class ids -> RGB in ``colours`` (ids past it wrap around); the ignore index black."""
    rgb = colours[labels.astype(np.int64) % len(colours)]
    rgb[labels == IGNORE_INDEX] = 0
    return rgb


def plot_strips(inputs: Mapping[str, Mapping], predictions: Mapping[str, Mapping[str, Mapping]],
                out_dir: str | os.PathLike, classes: list[str] | None = None, prefix: str = "strip") -> list[Path]:
    """One PNG per target (``<prefix>_<target>.png``): images, labels, then one row per model of
    ``predictions[target]`` (name -> encoded prediction). The written paths."""
    from .plots import _finish, _pyplot

    plt = _pyplot()
    colours = palette(classes)
    written = []
    for target, inp in inputs.items():
        images, labels = decode(inp["images"]), decode(inp["labels"])
        rows = [("image", images), ("label", colorize(labels, colours))]
        rows += [(name, colorize(decode(blob), colours)) for name, blob in predictions.get(target, {}).items()]
        n = len(images)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.2, 1.6 * len(rows)), squeeze=False)
        for r, (name, arr) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                ax.imshow(arr[c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        if classes:
            from matplotlib.patches import Patch

            handles = [Patch(color=colours[k] / 255, label=name) for k, name in enumerate(classes)]
            fig.legend(handles=handles, loc="lower center", ncol=min(len(classes), 6), fontsize=6, frameon=False)
        written.append(_finish(fig, Path(out_dir) / f"{prefix}_{target}.png", f"{target}: test images, labels and "
                               "predictions", rect=(0, 0.08 if classes else 0, 1, 1)))
    return written
