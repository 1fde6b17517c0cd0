"""How often a 95% interval of a mean over n seeds covers the true mean (issue 31, item 8).

    PYTHONPATH=src python benchmarks/interval_coverage.py --reps 4000 --resamples 999

For n = 2, 3, 5, 10 values drawn from distributions shaped like per-seed results (normal; a
skewed one, lognormal; a heavy-tailed one, Student's t with 3 degrees of freedom; an accuracy
near its ceiling, 100 x Beta(18, 2)), the share of ``--reps`` samples whose interval holds the
true mean, for the percentile bootstrap (what ``mergeq compare`` used before issue 31), the
bootstrap-t (studentized) and Student's t interval. Vectorised numpy, seeded; prints a Markdown
table. Student's t is exact for normal values at every n >= 2; the percentile bootstrap of two
values is [min, max], which covers the mean half the time.
"""
from __future__ import annotations

import argparse

import numpy as np

DISTRIBUTIONS = {
    "normal": (lambda rng, size: rng.normal(0.0, 1.0, size), 0.0),
    "lognormal": (lambda rng, size: rng.lognormal(0.0, 1.0, size), float(np.exp(0.5))),
    "t3": (lambda rng, size: rng.standard_t(3, size), 0.0),
    "accuracy": (lambda rng, size: 100 * rng.beta(18, 2, size), 90.0),
}


def _percentile(x: np.ndarray, idx: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    means = x[np.arange(len(x))[:, None, None], idx].mean(-1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1))


def _bootstrap_t(x: np.ndarray, idx: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[1]
    res = x[np.arange(len(x))[:, None, None], idx]
    m, s = x.mean(1), x.std(1, ddof=1) / np.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (res.mean(-1) - m[:, None]) / (res.std(-1, ddof=1) / np.sqrt(n))
    t = np.where(np.isfinite(t), t, np.nan)  # a resample of one repeated value has no spread
    lo_q, hi_q = np.nanquantile(t, [(1 + level) / 2, (1 - level) / 2], axis=1)
    return m - lo_q * s, m - hi_q * s


def _student(x: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    from mergeq.eval.intervals import t_half_width  # what mergeq compare uses

    half = t_half_width(x, level)
    return x.mean(1) - half, x.mean(1) + half


def coverage(dist: str, n: int, reps: int, resamples: int, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    draw, mu = DISTRIBUTIONS[dist]
    x = draw(rng, (reps, n))
    idx = rng.integers(0, n, (reps, resamples, n))
    out = {}
    for name, (lo, hi) in {"percentile bootstrap": _percentile(x, idx, level),
                           "bootstrap-t": _bootstrap_t(x, idx, level), "Student's t": _student(x, level)}.items():
        out[name] = float(np.mean((lo <= mu) & (mu <= hi)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4000)
    ap.add_argument("--resamples", type=int, default=999)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 5, 10])
    args = ap.parse_args()
    names = ["percentile bootstrap", "bootstrap-t", "Student's t"]
    print("| distribution | n | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for dist in DISTRIBUTIONS:
        for n in args.ns:
            cov = coverage(dist, n, args.reps, args.resamples)
            print(f"| {dist} | {n} | " + " | ".join(f"{100 * cov[k]:.1f}%" for k in names) + " |")


if __name__ == "__main__":
    main()
