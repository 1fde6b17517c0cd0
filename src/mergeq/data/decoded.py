"""Folder images decoded once: 8-bit pixels cached as safetensors, normalised batch by batch.

``decoded_pixels(paths, resize, crop, cache_dir, fingerprint)`` returns the N x 3 x crop x crop
uint8 pixels of ``paths`` (resized and centre cropped as :func:`~mergeq.data.folder.resize_crop`),
read from ``<cache_dir>/images/<key>.safetensors`` when an earlier run or command decoded them,
else decoded in parallel worker processes (``concurrent.futures``, numpy and Pillow only) and
written there atomically (:func:`mergeq.io.save_checkpoint`: one file, its SHA-256 checked on
read, rebuilt with a warning when damaged; a lock file per entry lets concurrent processes decode
once). The key hashes the resize, the crop and the domain's file ``fingerprint`` (names, sizes and
contents: :func:`mergeq.data.folder._fingerprint`), so an edited, added or removed image is decoded
again, and a copy of the same files elsewhere reuses the entry. Normalisation is not in the key:
pixels are stored before it (a quarter of the float size), and :class:`DecodedImages` applies any
normalisation on read, exactly as the lazy transform does (the same float operations on the same
pixels).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CheckpointError
from ..io import file_lock, load_checkpoint, save_checkpoint
from .folder import FolderDataError, ImageTransform, read_image, resize_crop

log = logging.getLogger(__name__)
CHUNK = 32  # images per task of a decode worker


def _decode_one(path: str, resize: int, crop: int) -> np.ndarray:
    try:
        return resize_crop(read_image(path), resize, crop)
    except FolderDataError as e:
        raise FolderDataError(f"image {path}: {e}") from None


def _decode_chunk(paths: Sequence[str], resize: int, crop: int) -> np.ndarray:
    """Worker task: the uint8 pixels of ``paths`` (no torch in here: safe in a forked process)."""
    return np.stack([_decode_one(p, resize, crop) for p in paths])


def decode(paths: Sequence[Path], resize: int, crop: int, workers: int | None = None) -> torch.Tensor:
    """Decode ``paths`` into N x 3 x crop x crop uint8 pixels, ``workers`` processes side by side
    (default: one per CPU this process may use; one process for a single chunk)."""
    chunks = [[str(p) for p in paths[i:i + CHUNK]] for i in range(0, len(paths), CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(chunks))
    if workers <= 1:
        parts = [_decode_chunk(c, resize, crop) for c in chunks]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            parts = list(pool.map(_decode_chunk, chunks, [resize] * len(chunks), [crop] * len(chunks)))
    return torch.from_numpy(np.concatenate(parts))


def cache_key(resize: int, crop: int, fingerprint: str) -> str:
    """Hash of what decides the pixels (module docstring)."""
    text = json.dumps({"fingerprint": fingerprint, "resize": resize, "crop": crop})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decoded_pixels(paths: Sequence[Path], folder: Path, resize: int, crop: int, cache_dir: str | Path,
                   fingerprint: str, name: str = "images") -> torch.Tensor:
    """The pixels of ``paths``, from the cache or decoded once and cached (module docstring)."""
    key = cache_key(resize, crop, fingerprint)
    path = Path(cache_dir) / "images" / f"{name}-{key}.safetensors"
    with file_lock(Path(cache_dir) / ".locks" / f"images-{key}.lock"):
        if path.exists():
            try:
                tensors, meta = load_checkpoint(path)
                if meta.get("key") == key and tensors["pixels"].shape[0] == len(paths):
                    log.info("reusing decoded images %s", path)
                    return tensors["pixels"]
                log.warning("rebuilding decoded images %s: it holds other images than its name says", path)
            except (CheckpointError, KeyError) as e:
                log.warning("rebuilding decoded images: %s", e)
        pixels = decode(paths, resize, crop)
        save_checkpoint({"pixels": pixels}, path, {"key": key, "folder": str(folder), "resize": resize, "crop": crop})
        log.info("decoded %d images of %s once into %s", len(paths), folder, path)
        return pixels


class DecodedImages(Dataset):
    """Labelled images held as 8-bit pixels (``pixels[index]``), normalised by ``transform`` on read."""

    def __init__(self, pixels: torch.Tensor, labels: Sequence[int], index: Sequence[int],
                 transform: ImageTransform) -> None:
        self.pixels, self.transform = pixels, transform
        self.index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.take_batch([i])
        return x[0], int(y[0])

    def take_batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of items ``idx`` (what ``data_utils.take`` reads, without per-item copies)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return self.transform.normalize(self.pixels[self.index[idx]]), self.labels[idx]
