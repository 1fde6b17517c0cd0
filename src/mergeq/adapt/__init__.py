"""Adaptation: source training and SHOT experts (Liang et al., ICML 2020).

``PRESETS[name] = (arch, arch_kwargs, SourceConfig, ShotConfig)`` for the digits benchmark
(3 targets), checked with ``benchmarks/adaptation_check.py``. Budgets: ``quick`` (source +
all experts <= 40 s on 2 cores) and ``default`` (<= 3 min). The timings measured so far were
taken while other jobs shared the CPU, so they are upper bounds. On seeds 0-2, SHOT gains only
4-7 points on ``mnistm`` in 3 of 6 runs; see the numbers in that script's report.
"""
from .shot import ShotConfig, centroid_pseudo_labels, information_maximization, recalibrate_batchnorm, shot
from .source import SourceConfig, augment, train_source

PRESETS = {
    "quick": ("resnet8", {"width": 16}, SourceConfig(epochs=6), ShotConfig(epochs=4)),
    "default": ("resnet8", {"width": 16}, SourceConfig(epochs=15), ShotConfig(epochs=8)),
}

__all__ = ["PRESETS", "ShotConfig", "SourceConfig", "augment", "centroid_pseudo_labels",
           "information_maximization", "recalibrate_batchnorm", "shot", "train_source"]
