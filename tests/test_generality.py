"""Quantize-then-merge works on any nn.Module of Conv2d/Linear/BatchNorm/ReLU, not only ours."""
import copy

import pytest
import torch

from mergeq import merge, quantize
from mergeq.nn import quant_modules
from mergeq.quant import qrange


def _torchvision():
    try:  # torchvision fails with RuntimeError (not ImportError) beside a CPU-only torch build
        import torchvision

        return torchvision
    except Exception:
        return None


def _check_on_grid(model):
    for name, m in quant_modules(model):
        codes = m.int_weight()
        lo, hi = qrange(m.w_bits, True)
        assert torch.equal(m.weight, codes * m.w_step), name
        assert codes.min() >= lo and codes.max() <= hi, name


def test_rtn_quantize_and_merge_any_model(any_model, images):
    experts = []
    for seed in range(2):
        e = copy.deepcopy(any_model)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        experts.append(quantize(e, "rtn", calib=images, w_bits=4, a_bits=4))
    for q in experts:
        _check_on_grid(q)
        assert q(images).shape == any_model(images).shape
    merged = merge(experts)
    _check_on_grid(merged)
    assert torch.isfinite(merged(images)).all()


@pytest.mark.skipif(_torchvision() is None, reason="torchvision is not importable beside this torch build")
def test_torchvision_resnet18(images):
    model = _torchvision().models.resnet18(num_classes=10).eval()
    q = quantize(model, "rtn", calib=torch.randn(8, 3, 64, 64), w_bits=4, a_bits=8)
    _check_on_grid(q)
    assert merge([q, q])(torch.randn(2, 3, 64, 64)).shape == (2, 10)
