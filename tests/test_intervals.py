"""Student's t intervals over seeds and their sentence (mergeq.eval.intervals): properties that must hold."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeq.eval.intervals import MIN_VERDICT_SEEDS, Interval, mean_ci, paired_diff_ci, verdict

points = st.floats(-100, 100, allow_nan=False)
# differences of accuracy points (six decimals): a difference of 1e-292 once drew a NaN from scipy's t interval
accuracy_points = st.floats(-20, 20, allow_nan=False).map(lambda x: round(x, 6))
seeds = st.lists(points, min_size=2, max_size=12)
EPS = 1e-9


@settings(max_examples=60, deadline=None)
@given(seeds)
def test_the_interval_contains_the_mean(values):
    ci = mean_ci(values)
    assert ci.n == len(values) and ci.low - EPS <= ci.estimate <= ci.high + EPS


@settings(max_examples=30, deadline=None)
@given(points, st.integers(2, 12), points)
def test_constant_differences_give_a_zero_width_interval_at_that_value(d, n, base):
    b = [base + k for k in range(n)]
    ci = paired_diff_ci([x + d for x in b], b)
    assert ci.low == pytest.approx(ci.high, abs=1e-9) and ci.estimate == pytest.approx(d, abs=1e-9)
    assert ci.low == pytest.approx(d, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(points, points), min_size=2, max_size=12))
def test_swapping_a_and_b_negates_the_interval(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab, ba = paired_diff_ci(a, b), paired_diff_ci(b, a)
    assert ba.estimate == pytest.approx(-ab.estimate, abs=1e-9)
    assert ba.low == pytest.approx(-ab.high, abs=1e-9) and ba.high == pytest.approx(-ab.low, abs=1e-9)


def _printed(sentence: str) -> tuple[float, float, float]:
    est = float(re.search(r": ([+-]\d+\.\d) points", sentence).group(1))
    low, high = map(float, re.search(r"CI \[([+-]\d+\.\d), ([+-]\d+\.\d)\]", sentence).groups())
    return est, low, high


@settings(max_examples=200, deadline=None)
@given(points, points, points, st.integers(2, 50))
def test_the_verdict_matches_the_printed_interval(x, y, z, n):
    low, est, high = sorted([x, y, z])
    sentence = verdict("hdrq", "qdrop", "W3A3", Interval(est, low, high, n))
    p_est, p_low, p_high = _printed(sentence)
    assert (p_est, p_low, p_high) == (round(est, 1) + 0.0, round(low, 1) + 0.0, round(high, 1) + 0.0)
    assert sentence.startswith("hdrq vs qdrop at W3A3: ") and f"over {n} paired seeds" in sentence
    if n < MIN_VERDICT_SEEDS:
        assert "too few for a verdict" in sentence and "better" not in sentence and "worse" not in sentence
    elif p_low > 0:
        assert sentence.endswith(f"hdrq is better by {abs(p_est):.1f} points")
    elif p_high < 0:
        assert sentence.endswith(f"hdrq is worse by {abs(p_est):.1f} points")
    else:
        assert sentence.endswith("no detectable difference")


def test_one_seed_gives_no_interval_and_bad_input_is_named():
    ci = paired_diff_ci([81.0], [79.5])
    assert (ci.estimate, ci.low, ci.high, ci.n) == (1.5, None, None, 1)
    assert verdict("hdrq", "qdrop", "W4A4", ci) == (
        "hdrq vs qdrop at W4A4: +1.5 points on 1 paired seed: no interval can be given (it needs at least "
        "2 paired seeds), so no difference can be claimed")
    with pytest.raises(ValueError, match=r"^paired_diff_ci: a and b must pair up, got 2 and 1 values$"):
        paired_diff_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"^mean_ci: expected a non-empty list"):
        mean_ci([])


def test_the_interval_repeats_and_narrows_with_more_seeds():
    a = [80.0, 84.0, 78.0, 86.0, 82.0, 79.0]
    assert mean_ci(a) == mean_ci(a)
    wide, narrow = mean_ci(a[:3]), mean_ci(a * 4)
    assert narrow.high - narrow.low < wide.high - wide.low


@settings(max_examples=40, deadline=None)
@given(st.lists(accuracy_points, min_size=2, max_size=12), st.lists(accuracy_points, min_size=12, max_size=12))
def test_paired_t_interval_is_centred_and_antisymmetric(a, b):
    from mergeq.eval.intervals import paired_t

    b = b[:len(a)]
    t = paired_t(a, b)
    d = [x - y for x, y in zip(a, b)]
    if len(set(d)) == 1:
        assert t is None
        return
    low, high, p = t
    mean = sum(d) / len(d)
    assert low <= mean <= high and abs((mean - low) - (high - mean)) < 1e-6 * max(1.0, abs(mean)) + 1e-9
    assert 0.0 <= p <= 1.0
    nlow, nhigh, np_ = paired_t(b, a)
    assert abs(nlow + high) < 1e-6 and abs(nhigh + low) < 1e-6 and abs(np_ - p) < 1e-9


def test_the_prediction_interval_covers_new_draws_at_its_level():
    """Normal samples of 10: a new draw falls in the 95% prediction interval about 95% of the time."""
    import numpy as np

    from mergeq.eval.intervals import prediction_interval

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        x = rng.normal(80, 4, size=11)
        low, high = prediction_interval(x[:10])
        hits += low <= x[10] <= high
    assert 0.94 <= hits / 4000 <= 0.96
    assert prediction_interval([3.0]) is None
