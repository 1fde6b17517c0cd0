"""GPU housekeeping of the commands (issue 30): out-of-memory errors as one line, worker
processes spread over the visible GPUs.

* :func:`out_of_memory` turns ``torch.OutOfMemoryError`` (CUDA's "CUDA out of memory. Tried to
  allocate ...", or the host allocator's) into a :class:`~mergeq.errors.DeviceMemoryError` that
  says what was asked, what is free (``torch.cuda.mem_get_info``) and what to lower; the CLI and
  the bench cells use it (:func:`memory_errors`).
* :func:`worker_devices` and :func:`pin_worker`: a local process pool on ``cuda`` runs one
  process per visible GPU by default, each pinned to its own device with
  ``torch.cuda.set_device`` (``cuda`` then means that GPU in the process; an explicit
  ``cuda:N`` stays on GPU N). Torch initialises CUDA lazily, so pinning in the pool's
  initializer precedes any CUDA work.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

from .errors import DeviceMemoryError

_ASKED = re.compile(r"tried to allocate ([0-9.]+ ?(?:bytes|[KMGT]?i?B))", re.IGNORECASE)
_GPU = re.compile(r"GPU (\d+)")
_LOWER = ("lower the batch sizes (ptq.options.<method>.batch_size / capture_batch, tta.batch_size, "
          "ptq.calib_size), run fewer workers")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def out_of_memory(error: BaseException, device: str | None = None) -> DeviceMemoryError:
    """The one-line error of an out-of-memory ``error``: for CUDA's, on ``device`` (default: the
    GPU the message names, else the current one), what was asked and what is free of the total;
    for the host's (torch raises the same type), what was asked."""
    import torch

    text = str(error)
    asked = _ASKED.search(text)
    asked = f"asked for {asked.group(1)}" if asked else "an allocation failed"
    if "CUDA" not in text or not torch.cuda.is_available():
        return DeviceMemoryError(f"out of host memory: {asked}; {_LOWER} or use a machine with more memory")
    if device is None or torch.device(device).index is None:
        gpu = _GPU.search(text)
        device = f"cuda:{gpu.group(1) if gpu else torch.cuda.current_device()}"
    try:
        free, total = torch.cuda.mem_get_info(device)
        room = f"{_gib(free)} free of {_gib(total)}"
    except (RuntimeError, AssertionError, ValueError):
        room = "free memory unknown"
    return DeviceMemoryError(f"out of GPU memory on {device}: {asked} with {room}; {_LOWER} per GPU, use a larger GPU "
                             "or --device cpu")


@contextlib.contextmanager
def memory_errors(device: str | None = None) -> Iterator[None]:
    """Re-raise a ``torch.OutOfMemoryError`` inside as :func:`out_of_memory`'s one-line error."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        raise out_of_memory(e, device) from e


def worker_devices(device: str, workers: int | None) -> list[str | None]:
    """The device each of a local pool's worker processes is pinned to: on plain ``cuda``, one
    process per visible GPU by default (``workers`` processes, if given, dealt over the GPUs in
    turn); None (no pinning) for a CPU, an explicit ``cuda:N`` or another device, with ``workers``
    (default 1) processes."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return [None] * (workers or 1)
    gpus = torch.cuda.device_count()
    return [f"cuda:{k % gpus}" for k in range(workers or gpus)]


def pin_worker(devices) -> None:
    """Pool initializer part: take this process's device from the queue ``devices`` and make it
    the process's current CUDA device (None: leave it)."""
    import torch

    device = devices.get()
    if device is not None:
        torch.cuda.set_device(torch.device(device))
