"""The statistics of the benchmark scripts: the test sample's share of the spread (variance_sources)
and the comparison at the same share of changed codes (budget_share)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_test_sample_sd_matches_a_simulation_of_binomial_test_sets():
    """The delta-method SD of a harmonic mean of binomial accuracies = the SD of simulated test sets."""
    test_sd = _script("variance_sources").test_sd
    acc, sizes = {"a": 0.85, "b": 0.83, "c": 0.93}, {"a": 900, "b": 750, "c": 750}
    rng = np.random.default_rng(0)
    draws = np.stack([rng.binomial(sizes[d], acc[d], 20000) / sizes[d] for d in acc])
    h = 3 / (1 / draws).sum(0)
    assert test_sd(acc, sizes) == pytest.approx(100 * h.std(), rel=0.05)
    assert test_sd({"a": 1.0, "b": 1.0}, {"a": 10, "b": 10}) == 0.0  # no spread at 100%


def test_at_share_interpolates_between_budgets_and_never_extrapolates():
    at_share = _script("budget_share").at_share
    points = [(20.0, 86.0), (8.0, 84.0), (14.0, 86.0)]  # (share %, merged hmean), any order
    assert at_share(points, 11.0) == pytest.approx(85.0)
    assert at_share(points, 17.0) == pytest.approx(86.0)
    assert at_share(points, 8.0) == pytest.approx(84.0)
    assert at_share(points, 7.9) is None and at_share(points, 20.1) is None
