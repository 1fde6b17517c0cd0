"""Option presets for the PTQ methods: ``paper``, ``default``, ``quick``.

``paper``: the papers' settings (20,000 iterations per unit, batch 32, 1,024 calibration
images); for a GPU. ``default`` and ``quick`` are sized for a 2-core CPU. Measured on this
machine (torch CPU, one intra-op thread) with ResNet-8 (width 16, 5 units / 10 layers,
32x32 inputs, W4A4), wall time of one ``quantize`` call (rtn / adaround / brecq / qdrop / hdrq):

    quick   (30 iters/unit, batch 32, calib 128):  0.2 / 3.8 / 2.9 / 4.5 / 4.7 s
    default (300 iters/unit, batch 32, calib 512): 0.4 / 17.3 / 23.5 / 38.5 / 39.7 s

With two threads on an idle machine default took 10.5 / 14.7 / - / 26.0 s for
adaround / brecq / hdrq; on a busy machine two threads can be 10x slower than one.
(benchmarks/recon_cost.py measures the cost of one step relative to an FP forward+backward.)
``rtn`` has no options. HDRQ's noise→fake-quant switch and all schedules scale with ``iters``.
"""
from __future__ import annotations

PRESETS = ("paper", "default", "quick")
_ITERS = {"paper": 20000, "default": 300, "quick": 30}
_CALIB = {"paper": 1024, "default": 512, "quick": 128}
_RECON = ("adaround", "brecq", "qdrop", "hdrq", "ttaq")


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
    return {"iters": _ITERS[preset], "batch_size": 32}
