"""95% intervals over seeds and the plain sentence that reads a paired difference (DESIGN "Evidence").

:func:`mean_ci` is the percentile bootstrap interval of a mean (``scipy.stats.bootstrap``, Efron &
Tibshirani 1993, ch. 13); :func:`paired_diff_ci` is the same interval of the per-seed differences
``a[i] - b[i]`` (paired resampling: a seed's two values are drawn together). Values of one number
have no interval (``None``); values that are all equal have a zero-width one at that value. The
resampling is seeded, so an interval repeats exactly. :func:`verdict` writes one sentence from the
interval *as printed* (rounded to :data:`DIGITS` decimals), so the words never contradict the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 9999
DIGITS = 1  # points are printed with one decimal


@dataclass(frozen=True)
class Interval:
    """A point estimate (a mean) with its interval over ``n`` values (``low``/``high`` None below 2)."""

    estimate: float
    low: float | None
    high: float | None
    n: int


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """The mean of ``values`` with its percentile bootstrap interval (no interval for one value)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mean_ci: expected a non-empty list of numbers, got {list(values)!r}")
    est = float(x.mean())
    if len(x) < 2:
        return Interval(est, None, None, len(x))
    if np.all(x == x[0]):
        return Interval(float(x[0]), float(x[0]), float(x[0]), len(x))
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method="percentile",
                    random_state=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(est, float(ci.low), float(ci.high), len(x))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                   seed: int = 0) -> Interval:
    """Mean of the paired differences ``a[i] - b[i]`` (same seed ``i``) with its bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci: a and b must pair up, got {len(a)} and {len(b)} values")
    return mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence, seed)


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """Student's t interval of the mean paired difference ``a[i] - b[i]`` and the paired t-test's
    two-sided p (``scipy.stats.ttest_1samp``); ``None`` below 2 pairs or when every difference is
    the same. Printed beside the bootstrap interval, which is too narrow over few seeds."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2 or np.all(d == d[0]):
        return None
    low, high = stats.t.interval(confidence, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    return float(low), float(high), float(stats.ttest_1samp(d, 0.0).pvalue)


def prediction_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Where one more value (a new seed, another machine's run) falls with probability ``confidence``,
    if values are normal: mean ± t_{n-1} · s · sqrt(1 + 1/n) (Student's prediction interval; wider
    than the interval of the mean by about sqrt(n + 1)). ``None`` below 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) * np.sqrt(1 + 1 / len(x))
    return float(x.mean() - half), float(x.mean() + half)


def signed(x: float) -> str:
    """``x`` points as printed everywhere: sign, :data:`DIGITS` decimals, never ``-0.0``."""
    return f"{round(x, DIGITS) + 0.0:+.{DIGITS}f}"


def verdict(a: str, b: str, where: str, diff: Interval, confidence: float = CONFIDENCE) -> str:
    """One sentence on ``a`` minus ``b`` at ``where`` (e.g. W3A3) from the interval as printed:
    better / worse when it excludes 0, else no detectable difference; no interval below 2 seeds."""
    head = f"{a} vs {b} at {where}: {signed(diff.estimate)} points"
    if diff.low is None:
        return (f"{head} on {diff.n} paired seed: no interval can be given (it needs at least 2 paired "
                "seeds), so no difference can be claimed")
    low, high = round(diff.low, DIGITS), round(diff.high, DIGITS)
    text = f"{head}, {100 * confidence:.0f}% CI [{signed(low)}, {signed(high)}] over {diff.n} paired seeds: "
    by = f"{abs(round(diff.estimate, DIGITS)):.{DIGITS}f} points"
    if low > 0:
        return text + f"{a} is better by {by}"
    if high < 0:
        return text + f"{a} is worse by {by}"
    return text + "no detectable difference"
