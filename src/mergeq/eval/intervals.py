"""95% intervals over seeds and the plain sentence that reads a paired difference (DESIGN "Evidence").

:func:`mean_ci` is Student's t interval of a mean, mean ± t_{n-1} · s / √n; :func:`paired_diff_ci`
the same interval of the per-seed differences ``a[i] - b[i]``. Chosen by simulation (issue 31;
``benchmarks/interval_coverage.py``, 4,000 samples per cell): for normal values its coverage is
95% at every n >= 2 (measured 94.7-95.3% at n = 2, 3, 5, 10; 95.7-96.4% for heavy-tailed t3
values), while the percentile bootstrap used before covered 51% at n = 2 (two values resample
to [min, max]), 75% at 3, 84% at 5 and 90% at 10, and the bootstrap-t is degenerate at n = 2 (0%)
and covered 84% at 3. Skewed values undercover with every method (t: 92-94.5% for accuracies
near a ceiling, 100 x Beta(18, 2); 83-89% for lognormal ones), so a verdict also needs
:data:`MIN_VERDICT_SEEDS`. Values of one number have no interval (``None``); values that are all
equal have a zero-width one at that value.

``bounds`` clips an interval to the range its quantity cannot leave (accuracies: [0, 100];
a difference of two accuracies: [-100, 100]): the true mean, and a new seed's value, lie in
that range, so clipping never lowers the coverage, and no interval claims an accuracy above
100%. :func:`verdict` writes one sentence from the interval *as printed* (rounded to
:data:`DIGITS` decimals), so the words never contradict the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
DIGITS = 1  # points are printed with one decimal
MIN_VERDICT_SEEDS = 6
"""Paired seeds a verdict needs: below 6, no test that does not assume normal differences can
reach 95% (the sign test's smallest two-sided p over n seeds is 2 / 2^n: 0.0625 at n = 5), and the
t interval's coverage rests on that assumption (DESIGN: a run on another CPU kind can move a
data-free merge by 10-30 points, so outliers are real)."""
Bounds = tuple[float, float] | None


@dataclass(frozen=True)
class Interval:
    """A point estimate (a mean) with its interval over ``n`` values (``low``/``high`` None below 2)."""

    estimate: float
    low: float | None
    high: float | None
    n: int


def _values(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{what}: expected a non-empty list of numbers, got {list(values)!r}")
    return x


def t_half_width(x: np.ndarray, confidence: float = CONFIDENCE, predict: bool = False) -> np.ndarray:
    """Half-width of Student's t interval of the mean of ``x`` along its last axis (n >= 2 values):
    t_{n-1} · s / √n, or with ``predict`` one new value's, t_{n-1} · s · √(1 + 1/n); 0 where every
    value is the same. Vectorised: ``x`` of shape [..., n] gives [...]."""
    from scipy import stats

    n = x.shape[-1]
    spread = np.where(np.all(x == x[..., :1], axis=-1), 0.0, x.std(axis=-1, ddof=1))
    return stats.t.ppf(0.5 + confidence / 2, n - 1) * spread * (np.sqrt(1 + 1 / n) if predict else 1 / np.sqrt(n))


def _clip(low: float, high: float, bounds: Bounds) -> tuple[float, float]:
    if bounds is None:
        return low, high
    return min(max(low, bounds[0]), bounds[1]), max(min(high, bounds[1]), bounds[0])


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, bounds: Bounds = None) -> Interval:
    """The mean of ``values`` with Student's t interval, clipped to ``bounds`` (no interval for one value)."""
    x = _values(values, "mean_ci")
    est = float(x.mean())
    if len(x) < 2:
        return Interval(est, None, None, len(x))
    half = float(t_half_width(x, confidence))
    return Interval(est, *_clip(est - half, est + half, bounds), len(x))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                   bounds: Bounds = None) -> Interval:
    """Mean of the paired differences ``a[i] - b[i]`` (same seed ``i``) with its t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci: a and b must pair up, got {len(a)} and {len(b)} values")
    return mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence, bounds)


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """The unclipped interval of :func:`paired_diff_ci` and the paired t-test's two-sided p
    (``scipy.stats.ttest_1samp``); ``None`` below 2 pairs or when every difference is the same."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2 or np.all(d == d[0]):
        return None
    ci = paired_diff_ci(a, b, confidence)
    return ci.low, ci.high, float(stats.ttest_1samp(d, 0.0).pvalue)


def prediction_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                        bounds: Bounds = None) -> tuple[float, float] | None:
    """Where one more value (a new seed, another machine's run) falls with probability ``confidence``,
    if values are normal: mean ± t_{n-1} · s · sqrt(1 + 1/n) (Student's prediction interval; wider
    than the interval of the mean by about sqrt(n + 1)), clipped to ``bounds``. ``None`` below 2 values."""
    x = _values(values, "prediction_interval")
    if len(x) < 2:
        return None
    half = float(t_half_width(x, confidence, predict=True))
    return _clip(float(x.mean()) - half, float(x.mean()) + half, bounds)


def signed(x: float) -> str:
    """``x`` points as printed everywhere: sign, :data:`DIGITS` decimals, never ``-0.0``."""
    return f"{round(x, DIGITS) + 0.0:+.{DIGITS}f}"


def verdict(a: str, b: str, where: str, diff: Interval, confidence: float = CONFIDENCE) -> str:
    """One sentence on ``a`` minus ``b`` at ``where`` (e.g. W3A3) from the interval as printed:
    better / worse when it excludes 0, else no detectable difference; no interval below 2 seeds,
    no verdict below :data:`MIN_VERDICT_SEEDS`."""
    head = f"{a} vs {b} at {where}: {signed(diff.estimate)} points"
    if diff.low is None:
        return (f"{head} on {diff.n} paired seed: no interval can be given (it needs at least 2 paired "
                "seeds), so no difference can be claimed")
    low, high = round(diff.low, DIGITS), round(diff.high, DIGITS)
    text = f"{head}, {100 * confidence:.0f}% CI [{signed(low)}, {signed(high)}] over {diff.n} paired seeds: "
    if diff.n < MIN_VERDICT_SEEDS:
        return text + (f"too few for a verdict (it needs at least {MIN_VERDICT_SEEDS} paired seeds: below that "
                       "no test reaches 95% without assuming normal differences)")
    by = f"{abs(round(diff.estimate, DIGITS)):.{DIGITS}f} points"
    if low > 0:
        return text + f"{a} is better by {by}"
    if high < 0:
        return text + f"{a} is worse by {by}"
    return text + "no detectable difference"
