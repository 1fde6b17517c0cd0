"""Turn the calibration / evaluation / training inputs users pass (tensor, Dataset, DataLoader) into batches.

Any map-style ``Dataset`` of ``(image, label)`` items (or of bare images) works, lazy ones such
as ``data.folder.FolderImages`` included; a ``TensorDataset`` is sliced directly (the same
values a DataLoader would stack, without the per-item copies), and so is a dataset with a
``take_batch(idx) -> (images, labels)`` method (``data.decoded.DecodedImages``).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import CalibrationDataError

DataLike = torch.Tensor | Dataset | DataLoader


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def iter_batches(data: DataLike, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield input batches (labels dropped) from a tensor, a Dataset of (x, y) or a DataLoader."""
    if isinstance(data, TensorDataset):
        data = data.tensors[0]
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
    elif isinstance(data, DataLoader):
        for batch in data:
            yield _images(batch)
    elif hasattr(data, "take_batch"):
        for i in range(0, len(data), batch_size):
            yield data.take_batch(range(i, min(i + batch_size, len(data))))[0]
    else:
        yield from iter_batches(DataLoader(data, batch_size=batch_size, shuffle=False), batch_size)


def take(data: torch.Tensor | Dataset, idx: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch ``(images, labels)`` of items ``idx`` (labels ``None`` for bare images), in that order.

    Random access for training loops over any map-style Dataset: a tensor or ``TensorDataset`` is
    indexed directly; other datasets are read item by item (lazy images decode here) and collated.
    """
    if isinstance(data, torch.Tensor):
        return data[idx], None
    if isinstance(data, TensorDataset):
        t = data.tensors
        return t[0][idx], (t[1][idx] if len(t) > 1 else None)
    if hasattr(data, "take_batch"):
        return data.take_batch(idx)
    if isinstance(data, DataLoader):
        raise TypeError("expected a tensor or a map-style Dataset (random access), got a DataLoader")
    items = [data[int(i)] for i in idx]
    if not items:
        raise ValueError("take needs at least one index")
    if not isinstance(items[0], (tuple, list)):
        return torch.stack(items), None
    labels = torch.stack([torch.as_tensor(it[1]) for it in items]) if len(items[0]) > 1 else None
    return torch.stack([it[0] for it in items]), labels


def as_tensor(data: DataLike, limit: int | None = None, what: str = "calibration data") -> torch.Tensor:
    """Collect up to ``limit`` inputs into one tensor; raise :class:`CalibrationDataError` if empty or not finite."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CalibrationDataError(f"the number of inputs to take from the {what} must be a positive integer "
                                   f"or None (all), got {limit!r}")
    parts, n = [], 0
    for x in iter_batches(data):
        parts.append(x)
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not parts or n == 0:
        raise CalibrationDataError(f"{what} is empty: expected at least one input")
    x = torch.cat(parts)[:limit]
    if not torch.is_floating_point(x):
        raise CalibrationDataError(f"{what} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise CalibrationDataError(f"{what} contains NaN or Inf values")
    return x
