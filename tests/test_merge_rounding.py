"""Rounding policies for quantized experts (Eq. 11, Eq. 12, cosine filter) and task-vector merges."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergeq import merge, quantize
from mergeq.errors import IncompatibleModelsError
from mergeq.merge import ROUNDINGS, disjoint_mean, task_vector_merge, trim
from mergeq.merge.noise import cosine_score, noise_rounding, noise_sample, noise_ties_rounding
from mergeq.merge.rounding import LayerStack

from .conftest import randomize_bn, tiny_resnet


def _layer(seed: int, n: int = 2, bits: int = 4, shape=(4, 6)) -> LayerStack:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = [torch.randint(lo, hi + 1, shape, generator=g).float() for _ in range(n)]
    steps = [(0.05 + torch.rand(shape[0], 1, generator=g)) for _ in range(n)]
    return LayerStack(codes, steps, bits)


def test_eq12_by_hand():
    """I=(1, 2), Δ=(1, 1): (1 + 0.4 + 2 - 0.3) / 2 = 1.55 -> 2 ; without noise it is the tie 1.5."""
    layer = LayerStack([torch.tensor([1.0]), torch.tensor([2.0])], [torch.ones(1), torch.ones(1)], 4)
    g = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    e1 = (torch.rand(1, generator=g2) - 0.5)
    e2 = (torch.rand(1, generator=g2) - 0.5)
    expected = torch.round((1 + e1 + 2 + e2) / 2)
    assert torch.equal(noise_sample(layer, [0.5, 0.5], g), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8))
def test_noise_never_changes_an_experts_own_code(seed, bits):
    """Merging one expert with Eq. 12: I·Δ + ε, ε ~ U[-Δ/2, Δ/2], rounds back to I."""
    layer = _layer(seed, n=1, bits=bits)
    out = noise_rounding([layer], [1.0], samples=5, seed=seed)
    assert torch.equal(out[0], layer.codes[0])


@pytest.mark.parametrize("select", ["model", "layer"])
def test_cosine_filter_returns_the_argmax_sample(select):
    layers, alphas, samples = [_layer(1), _layer(2, shape=(3, 5))], [0.5, 0.5], 12
    g = torch.Generator().manual_seed(7)
    draws = [[noise_sample(l, alphas, g) for l in layers] for _ in range(samples)]
    got = noise_rounding(layers, alphas, samples=samples, seed=7, select=select)
    if select == "model":
        scores = [float(cosine_score(d, layers, alphas)) for d in draws]
        best = draws[max(range(samples), key=scores.__getitem__)]
        assert all(torch.equal(a, b) for a, b in zip(got, best))
        assert float(cosine_score(got, layers, alphas)) == max(scores)
    else:
        for j, layer in enumerate(layers):
            scores = [float(cosine_score([d[j]], [layer], alphas)) for d in draws]
            assert float(cosine_score([got[j]], [layer], alphas)) == max(scores)


def test_noise_ties_changes_only_ambiguous_entries_and_never_lowers_both_cosines():
    layer, alphas = _layer(3), [0.5, 0.5]
    mid = (layer.codes[0] + layer.codes[1]) / 2
    nearest = torch.round(mid)
    out = noise_ties_rounding([layer], alphas, samples=50, seed=0)[0]
    odd = (layer.codes[0] + layer.codes[1]) % 2 == 1
    assert torch.equal(out[~odd], nearest[~odd])
    assert ((out - mid).abs() <= 0.5 + 1e-6).all()  # only ever picks one of the two neighbours


@pytest.mark.parametrize("rounding", ROUNDINGS.names())
def test_identical_quantized_experts_merge_to_themselves(rounding, images):
    q = quantize(randomize_bn(tiny_resnet()), "rtn", calib=images, w_bits=3, a_bits=4)
    merged = merge([q, copy.deepcopy(q)], rounding=rounding)
    for (k, a), b in zip(q.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    taus = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, -1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0, 0.0])]
    # sums: 3, 0 -> sign 0 (no agreeing entry), 2 -> +, 0
    # entry 0: elected +, agreeing 1 and 3 -> mean 2 ; entry 2: +, agreeing 3 -> 3 ; entry 1: sign 0 -> 0
    assert disjoint_mean(taus).tolist() == [2.0, 0.0, 3.0, 0.0]
    assert trim(torch.tensor([0.125, -0.5, 0.25, 0.0625]), 0.5).tolist() == [0.0, -0.5, 0.25, 0.0]


def test_task_arithmetic_equation():
    base = {"w": torch.tensor([1.0, 1.0])}
    experts = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}]
    assert task_vector_merge(base, experts, scale=0.5)["w"].tolist() == [1.5, 2.0]


def test_task_vector_methods_identity_and_errors():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    expert = copy.deepcopy(base)
    with torch.no_grad():
        expert[0].weight.add_(0.1)
    for method, kw in [("task_arithmetic", {"scale": 1 / 3}), ("ties", {"density": 1.0, "scale": 1.0})]:
        merged = merge([expert, copy.deepcopy(expert), copy.deepcopy(expert)], method=method, base=base, **kw)
        torch.testing.assert_close(merged[0].weight, expert[0].weight)
        with pytest.raises(ValueError, match="base"):
            merge([expert, expert], method=method)


def test_task_arithmetic_refuses_quantized_experts(images):
    model = randomize_bn(tiny_resnet())
    q = quantize(model, "rtn", calib=images, w_bits=4, a_bits=4)
    with pytest.raises(IncompatibleModelsError):
        merge([q, q], method="task_arithmetic", base=q)


def test_noise_rounding_bad_options():
    with pytest.raises(ValueError, match="samples"):
        noise_rounding([_layer(0)], [0.5, 0.5], samples=0)
    with pytest.raises(ValueError, match="select"):
        noise_rounding([_layer(0)], [0.5, 0.5], select="block")
