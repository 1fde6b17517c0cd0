"""Turn the calibration / evaluation inputs users pass (tensor, Dataset, DataLoader) into batches."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CalibrationDataError

DataLike = torch.Tensor | Dataset | DataLoader


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def iter_batches(data: DataLike, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield input batches (labels dropped) from a tensor, a Dataset of (x, y) or a DataLoader."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
    elif isinstance(data, DataLoader):
        for batch in data:
            yield _images(batch)
    else:
        yield from iter_batches(DataLoader(data, batch_size=batch_size, shuffle=False), batch_size)


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
