"""Say when a step did not work: log lines (INFO) with the accuracy a step reached, and a WARNING
with what to try when it is poor. The commands call these; the CLI shows both levels.

* the source model: its accuracy on the source domain's held-out test split; a warning below
  ``CHANCE_FACTOR`` (2) times chance (1 / classes): more optimizer steps, a larger learning rate,
  check the labels (class folders) and the image size;
* each SHOT expert: a warning when it is worse on its own target than the source model it was
  adapted from (by more than ``SHOT_TOLERANCE``, 1 point: the test splits are small);
* a merged model: a warning when it is below each expert on that expert's own domain by more than
  ``MERGE_MARGIN`` (20 points) on every target domain. Merges that work lose a few points per
  domain; the worst merge of docs/RESULTS.md §1 (RTN at W3A3) loses 21 points on one domain and
  stays within 4 on the others, so a 20-point loss on *every* domain means the merge, not one
  hard domain, failed.

Accuracies are fractions here, percentages in the messages.
"""
from __future__ import annotations

import logging
from typing import Mapping

log = logging.getLogger(__name__)

CHANCE_FACTOR = 2.0
SHOT_TOLERANCE = 0.01
MERGE_MARGIN = 0.20


def check_source(accuracy: float, domain: str, num_classes: int) -> bool:
    """Log the source model's held-out accuracy; warn (False) below twice chance."""
    chance = 1.0 / num_classes
    log.info("source model: %.1f%% on the held-out test split of %s (%d classes, chance %.1f%%)",
             100 * accuracy, domain, num_classes, 100 * chance)
    if accuracy >= CHANCE_FACTOR * chance:
        return True
    log.warning("the source model did not learn: %.1f%% on %s is below %.0f times chance (%.1f%%); try more "
                "optimizer steps (adapt.source.steps), a larger learning rate (adapt.source.lr), and check the "
                "labels (one class folder per class) and the image size (data.image_size)",
                100 * accuracy, domain, CHANCE_FACTOR, 100 * CHANCE_FACTOR * chance)
    return False


def check_expert(domain: str, source: float, expert: float, how: str = "shot") -> bool:
    """Log the expert's score on its target next to the source's; warn (False) if it is worse.
    ``how``: the adaptation, ``shot`` or ``dacs`` (segmentation), as its config section is named."""
    log.info("%s: source model %.1f%% -> %s expert %.1f%%", domain, 100 * source, how.upper(), 100 * expert)
    if expert >= source - SHOT_TOLERANCE:
        return True
    log.warning("%s made the %s expert worse than the source model on %s (%.1f%% < %.1f%%); try fewer %s "
                "steps or a smaller learning rate (adapt.%s.steps, adapt.%s.lr), or a better source model",
                how.upper(), domain, domain, 100 * expert, 100 * source, how.upper(), how, how)
    return False


def check_merged(what: str, experts: Mapping[str, float], merged: Mapping[str, float]) -> bool:
    """Warn (False) when ``merged`` is more than ``MERGE_MARGIN`` below every expert on its own domain."""
    gaps = {d: experts[d] - merged[d] for d in experts}
    if min(gaps.values()) <= MERGE_MARGIN:
        return True
    log.warning("%s: the merged model is more than %.0f points below every expert on its own domain (%s); the "
                "experts may be too far apart to average: try fewer or closer targets, fewer SHOT steps, or "
                "more bits", what, 100 * MERGE_MARGIN,
                ", ".join(f"{d} {100 * merged[d]:.1f}% vs {100 * experts[d]:.1f}%" for d in experts))
    return False
