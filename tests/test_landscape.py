import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from mergeq import quantize
from mergeq.eval import error_barrier, linear_path, loss_surface
from mergeq.nn import quant_modules

from .conftest import randomize_bn, tiny_resnet


def test_error_barrier_equation():
    assert error_barrier([1.0, 3.0, 2.0]) == pytest.approx(3.0 - 1.5)
    assert error_barrier([1.0, 0.5, 1.0]) == pytest.approx(0.0)  # the end points are on the grid
    with pytest.raises(ValueError):
        error_barrier([1.0])


@pytest.fixture
def pair(images):
    torch.manual_seed(0)
    base = randomize_bn(tiny_resnet())
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    data = {"d": TensorDataset(images, torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(0)))}
    return base, other, data


def test_path_ends_are_the_experts_and_identical_experts_have_no_barrier(pair, images):
    a, b, data = pair
    p = linear_path(a, b, data, points=5)
    assert p["lambda"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert p["loss_barrier"] == pytest.approx(max(p["loss"]) - (p["loss"][0] + p["loss"][-1]) / 2)
    flat = linear_path(a, copy.deepcopy(a), data, points=5)
    assert flat["loss_barrier"] == pytest.approx(0.0, abs=1e-5)


def test_quantized_path_stays_on_grid_and_surface_restores_weights(pair, images):
    a, b, data = pair
    qa = quantize(a, "rtn", calib=images, w_bits=4, a_bits=8)
    qb = quantize(b, "rtn", calib=images, w_bits=4, a_bits=8)
    p = linear_path(qa, qb, data, points=3)
    assert len(p["loss"]) == 3 and all(torch.isfinite(torch.tensor(p["loss"])))
    before = [m.weight.clone() for _, m in quant_modules(qa)]
    s = loss_surface(qa, data, points=3, seed=0)
    assert len(s["loss"]) == 3 and len(s["loss"][0]) == 3
    assert all(torch.equal(w, m.weight) for w, (_, m) in zip(before, quant_modules(qa)))
    assert all(m.quant_weight for _, m in quant_modules(qa))
