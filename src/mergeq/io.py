"""Checkpoints as safetensors plus a JSON sidecar, written atomically (temp file, then rename).

Nothing is ever unpickled: tensors come from safetensors, metadata from JSON.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def previous_rows(out: str | os.PathLike, config_yaml: str) -> list[dict]:
    """Rows of an earlier run in ``out`` whose ``config.yaml`` is exactly ``config_yaml`` (for
    resuming); [] when there is none, the config differs or ``results.json`` is unreadable."""
    res, cfg = Path(out) / "results.json", Path(out) / "config.yaml"
    if res.exists() and cfg.exists() and cfg.read_text() == config_yaml:
        try:
            return json.loads(res.read_text()).get("rows", [])
        except json.JSONDecodeError:
            logging.getLogger(__name__).warning("ignoring unreadable %s", res)
    return []


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``path`` (safetensors) and ``path`` with a ``.json`` suffix (metadata), both atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "mergeq": "1"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json(sidecar_path(path), meta)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` if missing or corrupt."""
    path = Path(path)
    side = sidecar_path(path)
    for p in (path, side):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {side} is not valid JSON: {e}") from None
    return tensors, meta
