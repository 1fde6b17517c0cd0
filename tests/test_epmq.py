"""E-PMQ: reduces to GPTQ with one expert and no anchor, lowers the expert-guided objective,
and rejects bad experts / calibration data."""
import pytest
import torch
from torch import nn

from mergeq.errors import CalibrationDataError, IncompatibleModelsError
from mergeq.merge import merge
from mergeq.nn import quant_modules
from mergeq.ptq import PTQ_METHODS, quantize
from mergeq.ptq.epmq import epmq_target
from mergeq.quant import QuantConfig

from .conftest import randomize_bn

CFG = QuantConfig(w_bits=3, a_bits=None, first_last_bits=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed):
    torch.manual_seed(seed)
    return randomize_bn(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12),
                                      nn.ReLU(), nn.Linear(12, 4)), seed)


def _data(seed, n=64, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g) @ torch.randn(10, 10, generator=g) + shift


def _weights(model):
    return [m.weight for _, m in quant_modules(model)]


def test_one_expert_no_anchor_equals_gptq_of_that_expert():
    e, d = _mlp(0), _data(1)
    g = quantize(e, "gptq", d, config=CFG)
    q = quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d], anchor=0.0)
    for a, b in zip(_weights(g), _weights(q)):
        assert torch.allclose(a, b, atol=1e-6)
    # inputs from the FP models: the merged model plays no part at all when mu = 0
    merged = merge([_mlp(0), _mlp(1)], "average")
    g = quantize(e, "gptq", d, config=CFG, sequential=False)
    q = quantize(merged, "epmq", d, config=CFG, experts=[e], expert_calib=[d], anchor=0.0, sequential=False)
    for a, b in zip(_weights(g), _weights(q)):
        assert torch.allclose(a, b, atol=1e-6)


def _depthwise(seed):
    torch.manual_seed(seed)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)), seed)


def test_grouped_convs_one_expert_no_anchor_equals_gptq_and_experts_guide_a_grouped_layer():
    e, d = _depthwise(0), torch.randn(24, 3, 6, 6)
    g = quantize(e, "gptq", d, config=CFG)
    q = quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d], anchor=0.0)
    for a, b in zip(_weights(g), _weights(q)):
        assert torch.allclose(a, b, atol=1e-6)
    # one grouped layer, two experts on two domains (as the Linear case below): closer to the experts
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2)) for _ in range(2)]
    merged = merge(experts, "average")
    mix = torch.randn(4, 4)
    data = [torch.einsum("ij,njhw->nihw", mix, torch.randn(24, 4, 6, 6)) + s for s in (0.0, 1.0)]
    q_g = quantize(merged, "gptq", torch.cat(data), config=CFG)
    q_e = quantize(merged, "epmq", torch.cat(data), config=CFG, experts=experts, expert_calib=data, anchor=0.1)

    def err(q):
        return sum((q(x) - ex(x)).pow(2).mean() for ex, x in zip(experts, data))

    assert err(q_e) < err(q_g)  # 0.76 vs 0.80: most of the error is the experts' disagreement


def test_grouped_target_solves_each_group_alone():
    """Per conv group: the rows of group g are epmq_target of that group's weights and Grams."""
    from mergeq.ptq.epmq import grouped_target

    g = torch.Generator().manual_seed(1)
    Wm, Ws = torch.randn(4, 3, generator=g), [torch.randn(4, 3, generator=g) for _ in range(2)]
    Gs = [torch.stack([(lambda X: 2 * X @ X.T / 20)(torch.randn(3, 20, generator=g)) for _ in range(2)])
          for _ in range(2)]
    Gm = Gs[0] + Gs[1]
    Wstar, H = grouped_target(Wm, Ws, Gs, Gm, 0.5, 0.01)
    assert H.shape == (2, 3, 3)
    for k, rows in enumerate((slice(0, 2), slice(2, 4))):
        want, Hk = epmq_target(Wm[rows], [W[rows] for W in Ws], [G[k] for G in Gs], Gm[k], 0.5, 0.01)
        assert torch.equal(Wstar[rows], want) and torch.equal(H[k], Hk)


def test_epmq_target_closed_form():
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(3, 5, generator=g) for _ in range(3)]
    Xs = [torch.randn(5, 40, generator=g) for _ in range(3)]
    Gs = [2 * X @ X.T / 40 for X in Xs[:2]]
    Wstar, H = epmq_target(Ws[2], Ws[:2], Gs, Gs[0] + Gs[1], 0.5, 0.0)
    # the gradient of the (undamped) objective vanishes at W*
    terms = [(Ws[0], Gs[0]), (Ws[1], Gs[1]), (Ws[2], 0.5 * (Gs[0] + Gs[1]))]
    grad = sum((Wstar - W.double()) @ G.double() for W, G in terms)
    assert grad.abs().max() < 1e-5
    assert torch.allclose(H.float(), 1.5 * (Gs[0] + Gs[1]))


def test_epmq_lowers_expert_guided_error_of_a_merged_layer():
    """One Linear layer, two experts on two domains: E-PMQ's weights fit the experts' outputs better than
    GPTQ of the merged layer."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(10, 8)) for _ in range(2)]
    merged = merge(experts, "average")
    data = [_data(3), _data(4, shift=1.0)]
    q_g = quantize(merged, "gptq", torch.cat(data), config=CFG)
    q_e = quantize(merged, "epmq", torch.cat(data), config=CFG, experts=experts, expert_calib=data, anchor=0.1)

    def err(q):
        return sum((q(x) - e(x)).pow(2).mean() for e, x in zip(experts, data))

    assert err(q_e) < 0.8 * err(q_g)
    assert all(torch.equal(m.weight, m.int_weight() * m.w_step) for _, m in quant_modules(q_e))


def test_epmq_with_anchor_on_conv_model_and_wa():
    def conv(seed):
        torch.manual_seed(seed)
        return randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(6 * 6 * 6, 4)), seed)

    experts = [conv(0), conv(1)]
    merged = merge(experts, "task_arithmetic", base=conv(2), scale=0.5)
    data = [torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6) + 0.5]
    q = quantize(merged, "epmq", torch.cat(data), w_bits=4, a_bits=8, experts=experts, expert_calib=data)
    assert torch.isfinite(q(data[0])).all()
    assert all(torch.equal(m.weight, m.int_weight() * m.w_step) for _, m in quant_modules(q))


def test_epmq_bad_inputs():
    e, d = _mlp(0), _data(1)
    assert "epmq" in PTQ_METHODS
    with pytest.raises(TypeError, match="experts"):
        quantize(e, "epmq", d, config=CFG)
    with pytest.raises(ValueError, match="at least one expert"):
        quantize(e, "epmq", d, config=CFG, experts=[], expert_calib=[])
    with pytest.raises(ValueError, match="expert_calib"):
        quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d, d])
    with pytest.raises(TypeError, match="unknown option"):
        quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d], bogus=1)
    with pytest.raises(ValueError, match="anchor"):
        quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d], anchor=-1.0)
    with pytest.raises(CalibrationDataError):
        quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[d[:0]])
    with pytest.raises(CalibrationDataError):
        quantize(e, "epmq", d, config=CFG, experts=[e], expert_calib=[torch.full_like(d, float("nan"))])
    wide = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(),
                         nn.Linear(12, 4))
    with pytest.raises(IncompatibleModelsError):
        quantize(e, "epmq", d, config=CFG, experts=[e, wide], expert_calib=[d, d])
    with pytest.raises(IncompatibleModelsError):
        quantize(e, "epmq", d, config=CFG, experts=[wide], expert_calib=[d])


def test_too_little_calibration_per_expert_is_a_warning(caplog):
    from mergeq.ptq.epmq import MIN_EXPERT_CALIB

    e = _mlp(0)
    few, enough = _data(1, n=MIN_EXPERT_CALIB - 1), _data(2, n=MIN_EXPERT_CALIB)
    with caplog.at_level("WARNING", logger="mergeq.ptq.epmq"):
        quantize(e, "epmq", enough, config=CFG, experts=[e, e], expert_calib=[enough, enough])
        assert not caplog.records
        quantize(e, "epmq", enough, config=CFG, experts=[e, e], expert_calib=[enough, few])
    (rec,) = caplog.records
    assert f"expert_calib [1] holds fewer than {MIN_EXPERT_CALIB} inputs ({MIN_EXPERT_CALIB - 1})" in rec.getMessage()
