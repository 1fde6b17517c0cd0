import pytest
import torch
from torch import nn

from mergeq.nn import QuantModule, calibrate_activations, execution_order, fold_bn, has_batchnorm, prepare, quant_modules
from mergeq.quant import QuantConfig, qrange


@pytest.mark.parametrize("with_example", [True, False])
def test_folded_model_equals_unfolded_in_eval(any_model, images, with_example):
    folded = fold_bn(any_model, images[:2] if with_example else None)
    assert not has_batchnorm(folded)
    assert has_batchnorm(any_model)  # input untouched
    torch.testing.assert_close(folded(images), any_model(images), atol=1e-5, rtol=1e-5)


def test_fold_adds_bias_by_the_formula():
    conv, bn = nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)
    conv.weight.data = torch.tensor([[[[2.0]]], [[[3.0]]]])
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    bn.weight.data = torch.tensor([0.5, 2.0])
    bn.bias.data = torch.tensor([0.1, 0.2])
    bn.eps = 0.0
    folded = fold_bn(nn.Sequential(conv, bn))
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded[0].weight.flatten(), torch.tensor([2.0 * 0.25, 3.0 * 2.0]))
    torch.testing.assert_close(folded[0].bias, torch.tensor([-1.0 * 0.25 + 0.1, 1.0 * 2.0 + 0.2]))


def test_prepare_wraps_every_layer_and_keeps_first_last_at_8_bits(any_model, images):
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in any_model.modules())
    q = prepare(any_model, QuantConfig(w_bits=3, a_bits=4), images[:2])
    qms = quant_modules(q)
    assert len(qms) == n_layers
    order = execution_order(fold_bn(any_model, images[:2]), images[:2])
    bits = {n: (m.w_bits, m.a_bits) for n, m in qms}
    assert bits[order[0]] == (8, 8) and bits[order[-1]] == (8, 8)
    assert all(bits[n] == (3, 4) for n in order[1:-1])
    q_all = prepare(any_model, QuantConfig(w_bits=3, a_bits=4, first_last_bits=None), images[:2])
    assert all((m.w_bits, m.a_bits) == (3, 4) for _, m in quant_modules(q_all))


def test_weight_only_config_has_no_activation_quantizers(any_model, images):
    q = prepare(any_model, QuantConfig(w_bits=4, a_bits=None), images[:2])
    assert all(m.act_quant is None for _, m in quant_modules(q))


def test_quantized_forward_is_close_at_8_bits(any_model, images):
    q = prepare(any_model, QuantConfig(w_bits=8, a_bits=8), images[:2])
    calibrate_activations(q, images)
    ref = any_model(images)
    err = (q(images) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.05


def test_quant_module_rejects_other_layers():
    with pytest.raises(TypeError, match="Conv2d or nn.Linear"):
        QuantModule(nn.ReLU(), 4, 4)


def test_prepare_rejects_model_without_layers():
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        prepare(nn.Sequential(nn.ReLU()), QuantConfig())


def test_int_weight_in_range_for_every_bit_width(images):
    lin = nn.Linear(16, 8)
    for bits in range(2, 9):
        qm = QuantModule(lin, bits, None)
        lo, hi = qrange(bits, True)
        codes = qm.int_weight()
        assert codes.min() >= lo and codes.max() <= hi
        qm.finalize()
        assert torch.equal(qm.weight, qm.int_weight() * qm.w_step)
