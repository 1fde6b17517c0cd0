"""Every preset of the experiment layer, in one place: ``quick``, ``default``, ``paper``.

What a preset fills in when the config leaves it unset (``None``):

* ``model``: ResNet-8 of width 16 (all presets); for segmentation data ``deeplab_mini`` of width 16;
* ``adapt.seg_source`` / ``adapt.dacs`` (segmentation): source training and DACS self-training
  checked on the embedded ``streets`` benchmark with ``benchmarks/seg_adaptation_check.py``;
* ``adapt.source`` / ``adapt.shot``: the source-training and SHOT settings below, checked on
  the digits benchmark (3 targets) with ``benchmarks/adaptation_check.py``. Budgets: ``quick``
  (source + all experts <= 40 s on 2 cores) and ``default`` (<= 3 min); ``paper`` uses
  ``default``'s. The colour jitter of source training re-standardises each image, which fits
  per-image standardised data only: data normalised otherwise (``imagenet``, ``none``) trains
  without it;
* ``ptq.options`` (per method) and ``ptq.calib_size``: :func:`mergeq.ptq.presets.ptq_options`
  and :func:`mergeq.ptq.presets.calib_size`, the single source of those numbers (they sit next
  to the measurements behind them); read here through :func:`ptq_options` and :func:`calib_size`.

* ``merge.recalibrate``: ``none`` for ``paper`` (the papers merge without data), ``bn+act`` otherwise:
  the merged model re-estimated on the targets' unlabeled calibration images
  (:mod:`mergeq.merge.recalibrate`), measured with ``benchmarks/merge_recalibration.py``
  (docs/RESULTS.md §3e).

Merge methods, rounding policies and TTA take their own defaults (their signatures and
dataclasses), whatever the preset.
"""
from __future__ import annotations

import dataclasses

from ..adapt.segmentation import DACSConfig, SegSourceConfig
from ..adapt.shot import ShotConfig
from ..adapt.source import SourceConfig
from ..ptq.presets import calib_size, ptq_options  # noqa: F401  (the single source of those numbers)

PRESET_NAMES = ("quick", "default", "paper")
MODEL = {"name": "resnet8", "kwargs": {"width": 16}}
SEG_MODEL = {"name": "deeplab_mini", "kwargs": {"width": 16}}
_SEG_ADAPT = {  # streets: source 600 / 1,200 steps, DACS 400 / 1,600 (benchmarks/seg_adaptation_check.py)
    "quick": (SegSourceConfig(), DACSConfig(steps=400)),
    "default": (SegSourceConfig(steps=1200), DACSConfig(steps=1600)),
}
_ADAPT = {
    "quick": (SourceConfig(epochs=6), ShotConfig(epochs=4)),
    "default": (SourceConfig(epochs=15), ShotConfig(epochs=8)),
}


def model(task: str) -> dict:
    """The model spec of ``task`` (classification or segmentation)."""
    return SEG_MODEL if task == "segmentation" else MODEL


def seg_adapt(preset: str) -> tuple[SegSourceConfig, DACSConfig]:
    """Segmentation source-training and DACS settings of ``preset``."""
    return _SEG_ADAPT["default" if preset == "paper" else preset]


def recalibrate(preset: str) -> str:
    """The ``merge.recalibrate`` mode of ``preset`` (module docstring)."""
    return "none" if preset == "paper" else "bn+act"


def adapt(preset: str, standardized: bool = True) -> tuple[SourceConfig, ShotConfig]:
    """Source-training and SHOT settings of ``preset``; without colour jitter unless the data are
    standardised per image (``standardized``)."""
    source, shot = _ADAPT["default" if preset == "paper" else preset]
    return (source if standardized else dataclasses.replace(source, color=0.0)), shot

