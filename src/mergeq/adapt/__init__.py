"""Adaptation: source training and SHOT experts (Liang et al., ICML 2020); TENT and ABL at test
time (:mod:`.tta`). The presets of the experiment layer: :mod:`mergeq.experiments.presets`."""
from .shot import ShotConfig, centroid_pseudo_labels, information_maximization, recalibrate_batchnorm, shot
from .source import SourceConfig, augment, train_source

__all__ = ["ShotConfig", "SourceConfig", "augment", "centroid_pseudo_labels", "information_maximization",
           "recalibrate_batchnorm", "shot", "train_source"]
