"""The one table of numeric bounds, checked wherever :mod:`mergeq.typed` checks a value's type.

Every ``int`` and ``float`` option (the config's sections, each PTQ method's options dataclass,
the merge methods' and rounding policies' keyword options, a command's own number flags) has its
range in :data:`BOUNDS`, keyed by the option's name, or by ``parent.name`` where a name means
something else there (``source.scale``, the zoom of source training, may be 0; a merge's
``scale`` may not). A float must also be finite. ``tests/test_bounds.py`` checks that every
numeric option has an entry and that a value past each bound is refused, naming the option's path.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError
from .quant.uniform import MAX_BITS, MIN_BITS

MAX_IMAGE_SIDE = 4096  # data.image_size: a 4096 x 4096 crop is 200 MB as floats
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes [0, 2**32 - 1]; torch and default_rng take more
MAX_PARAMETERS = 10**9  # a registered architecture's size from model.kwargs: 4 GB as float32
# counts of runs (issue 31): each seed trains or quantizes its own models, each cell runs the
# pipeline once (minutes on a CPU), each repeat is a merge and an evaluation, each sample a draw of
# every layer's noise: far past these a run would never finish (or, as a list, not fit in memory)
MAX_SEEDS = 1000  # grid.seeds, grid.ptq_seeds and compare's --seeds N / --ptq-seeds N
MAX_CELLS = 10_000  # cells of a bench / compare grid (methods x bits x target sets x seeds x PTQ seeds)
MAX_REPEATS = 1000  # merge.repeats (the HDRQ paper averages 30 merges)
MAX_SAMPLES = 100_000  # merge.rounding_options.samples (the reference code draws 100)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Bound:
    """``low`` <= value <= ``high`` (strict where ``*_open``); ``high`` may be a function (read at
    check time) and ``why`` says where it comes from."""

    low: float | None = None
    high: float | Callable[[], int] | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def upper(self) -> float | None:
        return self.high() if callable(self.high) else self.high

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (None: nothing)."""
        high = self.upper()
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'greater than' if self.low_open else 'at least'} {self.low}"
        if high is not None and (value >= high if self.high_open else value > high):
            why = f" ({self.why})" if self.why else ""
            return f"must be {'less than' if self.high_open else 'at most'} {high}{why}"
        return None


COUNT = Bound(1)  # epochs, iterations, batch sizes, images, samples: at least one
POSITIVE = Bound(0, low_open=True)  # learning rates, scales, temperatures, epsilons: > 0 (and finite)
NON_NEGATIVE = Bound(0)  # loss weights, decays, augmentation strengths: 0 switches them off
FRACTION = Bound(0, 1)  # probabilities and fractions of a run, 0 and 1 included
MOMENTUM = Bound(0, 1, high_open=True)
SEED = Bound(0, MAX_SEED)
CPUS = Bound(1, available_cpus, why="the CPUs this process may use")

BOUNDS: dict[str, Bound] = {
    # counts and sizes
    **dict.fromkeys(["epochs", "batch_size", "iters", "capture_batch", "blocksize", "group_size", "calib_size",
                     "n_images", "steps", "n", "slots"], COUNT),
    "repeats": Bound(1, MAX_REPEATS, why="merges averaged; the HDRQ paper averages 30"),
    "samples": Bound(1, MAX_SAMPLES, why="noise draws per merge; the reference code draws 100"),
    "min_steps": NON_NEGATIVE,  # adapt.source / adapt.shot: the floor of the epoch budget, 0: none
    "image_size": Bound(1, MAX_IMAGE_SIDE, why="the largest image side mergeq decodes to"),
    "resize": Bound(1, 2 * MAX_IMAGE_SIDE, why="twice the largest data.image_size"),
    "first_last_bits": Bound(MIN_BITS, MAX_BITS, why="the supported bit widths"),
    "severity": Bound(1, 5, why="the corruption severities"),
    "output": Bound(),  # model.output: an index into the forward's tuple, negative from the end
    # probabilities and fractions
    "density": Bound(0, 1, low_open=True),
    "test_fraction": Bound(0, 1, low_open=True, high_open=True),
    "label_smoothing": Bound(0, 1, high_open=True),
    **dict.fromkeys(["drop_prob", "warmup", "switch_frac", "lr_warmup", "translate"], FRACTION),
    "momentum": MOMENTUM,
    "source.scale": Bound(0, 1, high_open=True),  # source training's random zoom, 0: none
    "rotate": Bound(0, 180, why="degrees"),
    # rates, scales, temperatures
    **dict.fromkeys(["lr", "act_lr", "scale", "epsilon", "eps", "max_weight", "beta_start", "beta_end",
                     "pcr_sigma", "dirichlet_alpha", "alpha"], POSITIVE),
    **dict.fromkeys(["weight_decay", "beta", "ent_weight", "round_weight", "dist_lambda", "pem_lambda",
                     "pcr_weight", "anchor", "percdamp", "color", "noise", "tau", "freq_power", "grad_power",
                     "weights"], NON_NEGATIVE),
    # segmentation: source training and DACS (adapt.seg_source, adapt.dacs); data.size / data.crop
    "head_lr_mult": POSITIVE,
    **dict.fromkeys(["pseudo_threshold", "jitter_p", "blur_p"], FRACTION),
    **dict.fromkeys(["jitter_strength", "rcs_min_pixels"], NON_NEGATIVE),
    **dict.fromkeys(["rcs_temperature", "blur_sigma", "image_std"], POSITIVE),
    "image_mean": Bound(),  # a normalisation's per-channel mean: any finite number
    **dict.fromkeys(["size", "crop", "window", "stride"],
                    Bound(1, MAX_IMAGE_SIDE, why="the largest image side mergeq decodes to")),
    # a command's own flags: mergeq barrier / surface --points, --radius; mergeq data --per-domain
    "points": Bound(2, 101, why="a grid of at most 101 x 101 models"),
    "radius": POSITIVE,
    "per_domain": Bound(1, 100, why="images in a row of the sample grid"),
    # machine
    **dict.fromkeys(["seed", "seeds", "ptq_seeds", *(f"seeds.{k}" for k in ("split", "source", "shot", "ptq", "calib"))],
                    SEED),
    **dict.fromkeys(["threads", "workers"], CPUS),
}
"""Option name (or ``parent.name``) -> its bound; docs/CONFIG.md lists the same ranges."""


def bound_of(where: str) -> Bound | None:
    """The bound of the option at path ``where`` (``adapt.source.lr``, ``grid.seeds[0]``), if any."""
    parts = re.sub(r"(\[\d+\])+$", "", where).split(".")
    qualified = ".".join(parts[-2:])
    return BOUNDS.get(qualified) or BOUNDS.get(parts[-1])


def check_bound(where: str, value: int | float) -> int | float:
    """``value`` if it lies within the bound of ``where``'s option; else a ConfigError naming it."""
    problem = (bound_of(where) or Bound()).problem(value)
    if problem:
        raise ConfigError(f"{where}: {problem}, got {value!r}")
    return value


def check_count(where: str, count: int, limit: int, what: str, detail: str = "") -> int:
    """``count`` if it is at most ``limit``; else a ConfigError naming ``where``, the limit and
    (``detail``) where the count comes from."""
    if count > limit:
        raise ConfigError(f"{where}: at most {limit:,} {what}, got {count:,}{detail}")
    return count
