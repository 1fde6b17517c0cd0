import copy

import pytest
import torch
from torch import nn

from mergeq import merge, quantize
from mergeq.errors import IncompatibleModelsError
from mergeq.merge import average_state_dicts
from mergeq.nn import quant_modules
from mergeq.quant import qrange

from .conftest import randomize_bn, tiny_resnet, vgg_stack


def _perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_merge_of_identical_experts_is_identity(any_model):
    merged = merge([any_model, copy.deepcopy(any_model), copy.deepcopy(any_model)])
    for (k, a), b in zip(any_model.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_merge_equals_mean_of_parameters(any_model):
    experts = [_perturbed(any_model, s) for s in range(3)]
    merged = merge(experts)
    for name, p in merged.named_parameters():
        expected = sum(dict(e.named_parameters())[name] for e in experts) / 3
        torch.testing.assert_close(p, expected)


def test_weighted_merge_and_bad_weights(any_model):
    a, b = _perturbed(any_model, 0), _perturbed(any_model, 1)
    merged = merge([a, b], weights=[3, 1])
    name, p = next(iter(merged.named_parameters()))
    torch.testing.assert_close(p, 0.75 * dict(a.named_parameters())[name] + 0.25 * dict(b.named_parameters())[name])
    with pytest.raises(ValueError, match="non-negative"):
        merge([a, b], weights=[1, -1])


def test_bn_statistics_merge_as_mixture():
    sds = [
        {"bn.running_mean": torch.tensor([0.0]), "bn.running_var": torch.tensor([1.0])},
        {"bn.running_mean": torch.tensor([2.0]), "bn.running_var": torch.tensor([3.0])},
    ]
    out = average_state_dicts(sds)
    assert out["bn.running_mean"].item() == 1.0
    # mixture of N(0,1) and N(2,3): E[x^2] = (1 + 0 + 3 + 4) / 2 = 4, var = 4 - 1 = 3
    assert out["bn.running_var"].item() == pytest.approx(3.0)


def _quantized_pair(images, bits=(4, 4)):
    torch.manual_seed(0)
    base = randomize_bn(tiny_resnet())
    return [quantize(_perturbed(base, s), "rtn", calib=images, w_bits=bits[0], a_bits=bits[1]) for s in range(2)]


def test_quantized_merge_is_eq11_on_the_mean_grid(images):
    q1, q2 = _quantized_pair(images)
    merged = merge([q1, q2])
    for (name, m), (_, a), (_, b) in zip(quant_modules(merged), quant_modules(q1), quant_modules(q2)):
        step = (a.w_step + b.w_step) / 2
        expected = torch.round((a.int_weight() * a.w_step + b.int_weight() * b.w_step) / (a.w_step + b.w_step))
        lo, hi = qrange(m.w_bits, True)
        torch.testing.assert_close(m.w_step, step)
        assert torch.equal(m.int_weight(), expected.clamp(lo, hi)), name
        assert torch.equal(m.weight, m.int_weight() * m.w_step)
        assert m.w_bits == a.w_bits


def test_quantized_merge_hand_computed():
    """Eq. 11 on hand-made codes: I=(1,2,-3), Δ=1 and I=(2,2,0), Δ=3."""
    from mergeq.merge.rounding import LayerStack, float_rounding, nearest_rounding

    i1, i2 = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([2.0, 2.0, 0.0])
    layer = LayerStack([i1, i2], [torch.ones(3), 3 * torch.ones(3)], 4)
    # (1+6)/4 = 1.75 -> 2 ; (2+6)/4 = 2 ; (-3+0)/4 = -0.75 -> -1
    assert float_rounding([layer], [0.5, 0.5])[0].tolist() == [2.0, 2.0, -1.0]
    # integer mid-point: 1.5 -> 2 (half to even), 2 -> 2, -1.5 -> -2 (half to even)
    assert nearest_rounding([layer], [0.5, 0.5])[0].tolist() == [2.0, 2.0, -2.0]


def test_merge_rejects_different_architectures(images):
    with pytest.raises(IncompatibleModelsError, match="different architecture"):
        merge([tiny_resnet(), vgg_stack()])


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_task_vector_merges_name_quantized_experts_and_a_base_of_another_architecture(images, method):
    """Issue 24: ties on quantized experts said "QuantModule where Conv2d expected"; a base of
    another architecture was blamed on "model 1"."""
    torch.manual_seed(0)
    fp = [tiny_resnet(), tiny_resnet()]
    q = [quantize(m, "rtn", calib=images[:4], w_bits=4, a_bits=None) for m in fp]
    with pytest.raises(IncompatibleModelsError, match=f"{method} needs full-precision experts and base; "
                                                      "quantized: model 0, model 1"):
        merge(q, method, base=tiny_resnet())
    with pytest.raises(IncompatibleModelsError, match="quantized: the base"):
        merge(fp, method, base=q[0])
    with pytest.raises(IncompatibleModelsError, match="the base has a different architecture from model 0"):
        merge(fp, method, base=vgg_stack())
    with pytest.raises(IncompatibleModelsError, match=r"the base tensor '7.weight' has shape \(5, 16\)"):
        merge(fp, method, base=tiny_resnet(5))


def test_merge_rejects_different_shapes():
    with pytest.raises(IncompatibleModelsError, match="shape"):
        merge([nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 5))])


def test_merge_rejects_different_bit_widths(images):
    q4 = _quantized_pair(images, (4, 4))[0]
    q3 = _quantized_pair(images, (3, 4))[0]
    with pytest.raises(IncompatibleModelsError, match="W3A4"):
        merge([q4, q3])


def test_merge_rejects_empty_list_and_unknown_method(any_model):
    with pytest.raises(IncompatibleModelsError, match="at least one"):
        merge([])
    with pytest.raises(KeyError, match="known: average"):
        merge([any_model], method="nope")
