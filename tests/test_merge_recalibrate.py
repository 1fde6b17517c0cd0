"""merge.recalibrate: the merged model re-estimated on the targets' unlabeled calibration images."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from mergeq import merge, quantize
from mergeq.errors import CalibrationDataError
from mergeq.merge.recalibrate import RECALIBRATIONS, _layers, _moments, _scale_layer, recalibrate
from mergeq.nn import fold_bn, quant_modules
from mergeq.nn.prepare import calibrate_activations
from mergeq.nn.qmodule import QuantModule

from .conftest import randomize_bn, tiny_resnet, vgg_stack


def _experts(factory, n: int = 3, scale: float = 0.1) -> list[nn.Module]:
    """``n`` BN-folded variants of one model (perturbed weights and BN statistics)."""
    torch.manual_seed(0)
    base = randomize_bn(factory())
    out = []
    for k in range(n):
        m = randomize_bn(copy.deepcopy(base), seed=k + 1)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        out.append(fold_bn(m, torch.zeros(2, 3, 16, 16)))
    return out


def _domains(n: int = 3) -> list[torch.Tensor]:
    """One calibration set per expert, each from a shifted distribution."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(40, 3, 16, 16, generator=g) * (1 + 0.5 * k) + 0.3 * k for k in range(n)]


def _mixture(moments, alphas):
    mean = sum(a * m[0] for a, m in zip(alphas, moments))
    second = sum(a * m[1] for a, m in zip(alphas, moments))
    return mean, (second - mean ** 2).clamp_min(0).sqrt()


@pytest.mark.parametrize("factory", [tiny_resnet, vgg_stack])
@pytest.mark.parametrize("quantized", [False, True])
def test_bn_sets_every_layer_but_the_last_to_the_mixture_statistics(factory, quantized, one_thread):
    experts, calib = _experts(factory), _domains()
    if quantized:
        experts = [quantize(e, "rtn", calib=x, w_bits=4, a_bits=8) for e, x in zip(experts, calib)]
    alphas = [0.5, 0.3, 0.2]
    merged = recalibrate(merge(experts, weights=alphas), experts, calib, "bn", weights=alphas)
    names = _layers(merged, calib[0][:2])
    assert len(names) >= 4 and all(isinstance(merged.get_submodule(n), (nn.Conv2d, nn.Linear, QuantModule))
                                   for n in names)
    corrected = names[:-1]
    target = [_moments(e, corrected, x, 64) for e, x in zip(experts, calib)]
    got = [_moments(merged, corrected, x, 64) for x in calib]
    for n in corrected:
        mean_t, std_t = _mixture([t[n] for t in target], alphas)
        mean_m, std_m = _mixture([g[n] for g in got], alphas)
        torch.testing.assert_close(mean_m, mean_t, atol=1e-4, rtol=1e-4, msg=n)
        torch.testing.assert_close(std_m, std_t, atol=1e-4, rtol=1e-4, msg=n)
    # the classifier is left alone
    last = names[-1]
    torch.testing.assert_close(merged.get_submodule(last).bias, merge(experts, weights=alphas).get_submodule(last).bias)


def test_bn_keeps_the_integer_codes_and_the_grid(one_thread):
    experts, calib = _experts(tiny_resnet), _domains()
    experts = [quantize(e, "rtn", calib=x, w_bits=3, a_bits=4) for e, x in zip(experts, calib)]
    plain = merge(experts)
    merged = recalibrate(merge(experts), experts, calib, "bn")
    changed = 0
    for (name, a), (_, b) in zip(quant_modules(plain), quant_modules(merged)):
        assert b.on_grid(), name
        assert torch.equal(a.int_weight(), b.int_weight()), name
        changed += not torch.equal(a.w_step, b.w_step)
    assert changed >= 4


def test_act_reestimates_every_activation_step_on_the_pooled_images(one_thread):
    experts, calib = _experts(vgg_stack), _domains()
    experts = [quantize(e, "rtn", calib=x, w_bits=4, a_bits=4) for e, x in zip(experts, calib)]
    expected = merge(experts)
    calibrate_activations(expected, torch.cat(calib))
    merged = recalibrate(merge(experts), experts, calib, "act")
    plain = merge(experts)
    for (name, a), (_, b), (_, c) in zip(quant_modules(expected), quant_modules(merged), quant_modules(plain)):
        assert float(a.act_quant.step) == float(b.act_quant.step), name
        assert torch.equal(a.weight, b.weight)
    assert any(float(b.act_quant.step) != float(c.act_quant.step)
               for (_, b), (_, c) in zip(quant_modules(merged), quant_modules(plain)))


def test_bn_plus_act_is_bn_then_act(one_thread):
    experts, calib = _experts(tiny_resnet), _domains()
    experts = [quantize(e, "rtn", calib=x, w_bits=4, a_bits=4) for e, x in zip(experts, calib)]
    both = recalibrate(merge(experts), experts, calib, "bn+act")
    steps = recalibrate(recalibrate(merge(experts), experts, calib, "bn"), experts, calib, "act")
    for (k, a), b in zip(both.state_dict().items(), steps.state_dict().values()):
        assert torch.equal(a, b), k


def test_none_changes_nothing():
    experts, calib = _experts(tiny_resnet), _domains()
    merged = merge(experts)
    before = copy.deepcopy(merged.state_dict())
    assert recalibrate(merged, experts, calib, "none") is merged
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())


def test_bad_input_names_what_was_expected():
    experts, calib = _experts(tiny_resnet), _domains()
    with pytest.raises(ValueError, match="unknown mode 'repair'.*none, act, bn, bn\\+act"):
        recalibrate(merge(experts), experts, calib, "repair")
    with pytest.raises(ValueError, match="one calibration set per expert expected, got 2 sets for 3 experts"):
        recalibrate(merge(experts), experts, calib[:2], "bn")
    with pytest.raises(CalibrationDataError, match="expert 1 are empty"):
        recalibrate(merge(experts), experts, [calib[0], calib[1][:0], calib[2]], "bn")
    bad = calib[2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationDataError, match="expert 2 are not finite"):
        recalibrate(merge(experts), experts, [calib[0], calib[1], bad], "act")
    assert RECALIBRATIONS == ("none", "act", "bn", "bn+act")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 16), st.integers(2, 8))
def test_a_channel_correction_is_exact_on_a_quantized_layer(seed, bits):
    """y -> y·a + b per channel: the codes stay, the output is the corrected output."""
    g = torch.Generator().manual_seed(seed)
    q = QuantModule(nn.Conv2d(3, 5, 3, padding=1), bits, None)
    with torch.no_grad():
        q.weight.copy_(q.w_quantizer.hard(q.weight, q.w_step, bits))
    x = torch.randn(2, 3, 6, 6, generator=g)
    scale, shift = torch.rand(5, generator=g) * 2 + 0.1, torch.randn(5, generator=g)
    codes, before = q.int_weight(), q(x).detach()
    _scale_layer(q, scale, shift)
    assert torch.equal(q.int_weight(), codes) and q.on_grid()
    torch.testing.assert_close(q(x), before * scale[:, None, None] + shift[:, None, None], rtol=1e-5, atol=1e-5)
