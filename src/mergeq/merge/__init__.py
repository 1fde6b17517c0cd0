"""Merging experts: merge methods (average, task_arithmetic, ties) and rounding policies that
keep merged quantized experts on a grid (float, nearest, noise, noise-ties).

The package itself is callable, ``mergeq.merge(models, method=...)`` being :func:`merge`, so
that the top-level name stays this package and ``import mergeq.merge.task_vectors`` works."""
import sys
import types
from typing import Sequence

from torch import nn

from ..registry import MERGE_METHODS
from . import average as _average, noise as _noise, task_vectors as _task_vectors  # noqa: F401 (register)
from .average import average_state_dicts
from .checks import check_mergeable
from .rounding import ROUNDINGS, check_rounding_options
from .task_vectors import disjoint_mean, task_vector_merge, trim


def merge(models: Sequence[nn.Module], method: str = "average", **options) -> nn.Module:
    """Merge ``models`` with a registered method; quantized experts stay quantized."""
    return MERGE_METHODS.get(method)(list(models), **options)


__all__ = ["MERGE_METHODS", "ROUNDINGS", "average_state_dicts", "check_mergeable", "check_rounding_options",
           "disjoint_mean", "merge", "task_vector_merge", "trim"]


class _CallablePackage(types.ModuleType):
    def __call__(self, models: Sequence[nn.Module], method: str = "average", **options) -> nn.Module:
        return merge(models, method, **options)


sys.modules[__name__].__class__ = _CallablePackage
