"""The exact rules of TIES and of BatchNorm buffers under task-vector merging (issue 15)."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mergeq
from mergeq.errors import IncompatibleModelsError
from mergeq.merge import disjoint_mean, task_vector_merge, trim


def test_ties_keeps_int_density_times_n_entries_like_mergekit():
    tau = torch.arange(1.0, 9.0)  # 8 entries
    assert int((trim(tau, 0.2) != 0).sum()) == 1  # int(1.6); round() gave 2
    assert int((trim(torch.arange(1.0, 6.0), 0.7) != 0).sum()) == 3  # int(3.5); round() gave 4
    assert int((trim(torch.ones(4), 0.1) != 0).sum()) == 1  # int(0.4) = 0: one entry is kept
    # ties in magnitude: exactly k entries, the lower flat index first
    assert trim(torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5).tolist() == [1.0, -1.0, 0.0, 0.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=64), st.floats(0.01, 0.99))
def test_trim_count_and_kept_entries_property(values, density):
    tau = torch.tensor(values)
    out = trim(tau, density)
    kept = torch.nonzero(out.flatten() != 0).flatten().tolist()
    k = max(1, int(density * tau.numel()))
    assert len(kept) <= k  # == k unless a kept entry is itself 0
    # whatever is kept is as large as whatever is dropped, and kept entries are unchanged
    dropped = [i for i in range(tau.numel()) if i not in kept]
    if kept and dropped:
        assert min(tau.abs()[kept]) >= max(tau.abs()[dropped])
    assert torch.equal(out[kept], tau[kept])


def test_sign_election_on_an_exact_zero_sum():
    taus = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])]  # entry 0 sums to exactly 0
    assert disjoint_mean(taus).tolist() == [0.0, 1.5]  # the paper's sign(0) = 0: nothing agrees
    assert disjoint_mean(taus, sign_tie="positive").tolist() == [1.0, 1.5]  # mergekit's +1
    with pytest.raises(ValueError, match="sign_tie"):
        disjoint_mean(taus, sign_tie="up")


def _bn_model(var: float, tracked: int) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    m[1].running_var.fill_(var)
    m[1].num_batches_tracked.fill_(tracked)
    return m


def test_ties_option_reaches_the_merge():
    base = nn.Sequential(nn.Linear(1, 1, bias=False))
    base[0].weight.data.fill_(0.0)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    a[0].weight.data.fill_(1.0)
    b[0].weight.data.fill_(-1.0)
    zero = mergeq.merge([a, b], method="ties", base=base, density=1.0)
    plus = mergeq.merge([a, b], method="ties", base=base, density=1.0, sign_tie="positive")
    assert zero[0].weight.item() == 0.0 and plus[0].weight.item() == 1.0


def test_negative_running_var_from_task_arithmetic_is_refused():
    base = _bn_model(1.0, 100)
    experts = [_bn_model(0.5, 7 + k) for k in range(3)]
    with pytest.raises(IncompatibleModelsError, match=r"1\.running_var 2 negative"):
        mergeq.merge(experts, method="task_arithmetic", base=base, scale=1.0)  # 1 + 3·(-0.5) < 0
    merged = mergeq.merge(experts, method="task_arithmetic", base=base, scale=0.3)  # 1 - 0.45
    assert torch.allclose(merged[1].running_var, torch.full((2,), 0.55))
    assert int(merged[1].num_batches_tracked) == 100  # integer buffers: the base's, by rule


def test_average_takes_integer_buffers_from_the_first_model():
    merged = mergeq.merge([_bn_model(1.0, 3), _bn_model(2.0, 9)])
    assert int(merged[1].num_batches_tracked) == 3
    assert (merged[1].running_var >= 0).all()


def test_task_vector_merge_leaves_integer_buffers_of_the_base():
    base = {"n": torch.tensor(5), "w": torch.zeros(2)}
    out = task_vector_merge(base, [{"n": torch.tensor(1), "w": torch.ones(2)}], scale=1.0)
    assert int(out["n"]) == 5 and out["w"].tolist() == [1.0, 1.0]


def test_merge_package_is_importable_and_callable():
    import importlib

    tv = importlib.import_module("mergeq.merge.task_vectors")
    import mergeq.merge.task_vectors as tv2  # the form the issue reports failing

    assert tv is tv2 and tv.trim is trim
    m = mergeq.merge([nn.Linear(2, 2), nn.Linear(2, 2)], method="average")
    assert isinstance(m, nn.Linear)

