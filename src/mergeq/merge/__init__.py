"""Merging experts: a registry of merge methods and rounding policies for quantized experts."""
from typing import Sequence

from torch import nn

from ..registry import MERGE_METHODS
from . import average as _average  # noqa: F401  (registers "average")
from .average import average_state_dicts
from .checks import check_mergeable
from .rounding import ROUNDINGS


def merge(models: Sequence[nn.Module], method: str = "average", **options) -> nn.Module:
    """Merge ``models`` with a registered method; quantized experts stay quantized."""
    return MERGE_METHODS.get(method)(list(models), **options)


__all__ = ["ROUNDINGS", "average_state_dicts", "check_mergeable", "merge"]
