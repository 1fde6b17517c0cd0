"""The experiment layer: one typed config, one model pool, one output folder rule, one report.

``run`` (quantize, then merge), ``run_pmq`` (merge, then quantize), ``run_tta`` (quantize, then
adapt on a stream), ``run_grid`` (``run`` over a grid of cells) and the step commands
(:mod:`.steps`) all take a :class:`Config` (:func:`load_config` reads one from YAML).
"""
from .bench import run_grid
from .config import Config, load_config, resolve
from .pmq import run_pmq
from .pool import Pool
from .run import run
from .tta import run_tta

__all__ = ["Config", "Pool", "load_config", "resolve", "run", "run_grid", "run_pmq", "run_tta"]
