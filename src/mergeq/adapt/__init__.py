"""Adaptation: source training and SHOT experts (Liang et al., ICML 2020).

``PRESETS[name] = (arch, arch_kwargs, SourceConfig, ShotConfig)``, measured on 2 CPU
cores with ``benchmarks/adaptation_check.py`` for the digits benchmark (3 targets):
``quick`` (source + all experts <= 40 s) and ``default`` (<= 3 min).
"""
from .shot import ShotConfig, centroid_pseudo_labels, information_maximization, recalibrate_batchnorm, shot
from .source import SourceConfig, augment, train_source

PRESETS = {
    "quick": ("resnet8", {"width": 16}, SourceConfig(epochs=4), ShotConfig(epochs=4)),
    "default": ("resnet8", {"width": 16}, SourceConfig(epochs=12), ShotConfig(epochs=10)),
}

__all__ = ["PRESETS", "ShotConfig", "SourceConfig", "augment", "centroid_pseudo_labels",
           "information_maximization", "recalibrate_batchnorm", "shot", "train_source"]
