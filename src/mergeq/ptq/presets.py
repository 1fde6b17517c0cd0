"""Option presets for the PTQ methods: ``paper``, ``default``, ``quick``.

``paper``: the papers' settings exactly (20,000 iterations per unit, batch 32, 1,024 calibration
images, AdaRound's V trained with Adam at lr 1e-3); for a GPU. ``default`` and ``quick`` are
sized for a 2-core CPU (300 and 100 iterations per unit).

``default`` trains AdaRound's V (adaround, brecq, qdrop) at lr 1e-2 instead of 1e-3, chosen from
the convergence curves (docs/RESULTS.md §3b, ``benchmarks/convergence.py``, W3A3): at 300
iterations with lr 1e-3, V moves too little (4-5% of the codes leave round-to-nearest) and the
merged hmean is 3-6 points below the same method's at 3,000 iterations; at lr 1e-2 the
300-iteration hmean of each of the three (79.4 / 81.9 / 81.2) is within the seed spread of its
3,000-iteration value (82.0 / 82.7 / 80.0), about 90% or more of its gain over RTN (RTN: 46 ± 9
in §3). HDRQ (lr 1e-3 on the weights) needs no change: its merged hmean is highest at 300
iterations. At W4A4 (§3b) lr 1e-2 is neutral to slightly better (+0.5 to +1.5 at 300 iterations).
TTAQ keeps lr 1e-3 (not measured).

``quick`` (the README's first command) is the one-minute version: 100 iterations with the same
lr, which §3b found within about 1 point of 300 on the merged hmean (W3A3: 78.3 / 80.8 / 80.5 /
82.5 against 79.4 / 81.9 / 81.2 / 83.4 for AdaRound / BRECQ / QDrop / HDRQ, three seeds) and
0.5-1 point below on the experts; with its shorter source training and SHOT and 128 calibration
images its numbers are a few points below ``default``'s (docs/RESULTS.md §1). It was a 30-iteration
smoke test before issue 22 (README command 1 within 6 minutes on a 2-core AVX2 machine): at 30
iterations QDrop's W3A3 experts had not learnt (44-64%) and its table ranked nothing.
(benchmarks/recon_cost.py measures the cost of one step relative to an FP forward+backward.)
``rtn`` has no options. HDRQ's noise→fake-quant switch and all schedules scale with ``iters``.
"""
from __future__ import annotations

PRESETS = ("paper", "default", "quick")
_ITERS = {"paper": 20000, "default": 300, "quick": 100}
_CALIB = {"paper": 1024, "default": 512, "quick": 128}
_RECON = ("adaround", "brecq", "qdrop", "hdrq", "ttaq")
_ADAROUND_FAMILY = ("adaround", "brecq", "qdrop")  # V learnt with Adam: lr 1e-2 at the CPU budgets


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")


def calib_size(preset: str) -> int:
    """Number of calibration inputs for ``preset``."""
    _check(preset)
    return _CALIB[preset]


def ptq_options(method: str, preset: str) -> dict:
    """Keyword options for ``quantize(..., method=method, **options)`` under ``preset``."""
    _check(preset)
    if method not in _RECON:
        return {}
    fast_v = {"lr": 1e-2} if preset != "paper" and method in _ADAROUND_FAMILY else {}
    return {"iters": _ITERS[preset], "batch_size": 32, **fast_v}
