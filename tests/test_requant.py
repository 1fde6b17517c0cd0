"""The evaluated model is the deployed model (issue 31 item 1): :func:`mergeq.deploy.requant.deployed`
rounds where the integer graph requantizes, and the int8 and QDQ files compute it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergeq.deploy import IntegerSimulation, export_onnx, ort_session, plan_integer
from mergeq.deploy.integer import Grid
from mergeq.deploy.requant import Requantize, deployed, plan_of
from mergeq.models import resnet8
from mergeq.ptq import quantize

from .conftest import randomize_bn

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort_session(path)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def w4a4():
    torch.manual_seed(0)
    q = quantize(randomize_bn(resnet8()), "rtn", calib=_images(64), w_bits=4, a_bits=4)
    return q, plan_integer(q, _images(64, seed=1))


def test_requantize_hook_rounds_onto_the_grid_with_a_straight_through_gradient():
    grid = Grid(0.25, 128)
    x = torch.linspace(-40, 40, 801, requires_grad=True)
    y = Requantize(grid)(nn.Identity(), (x,), x)
    codes = y.detach() / 0.25
    assert torch.equal(codes, codes.round()) and codes.min() == -128 and codes.max() == 127
    assert torch.equal(y.detach(), grid.dequantize(grid.quantize(x.detach())))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_deployed_model_is_the_integer_simulation_not_the_fake_quant_model(w4a4):
    q, plan = w4a4
    d = deployed(q, plan)
    assert plan_of(d) is plan and plan_of(q) is None  # a copy: the fake-quant model is unchanged
    x = _images(256, seed=2)
    with torch.no_grad():
        sim, dep, fq = IntegerSimulation(q, plan)(x), d(x), q(x)
    near = lambda a: (a - sim).abs().le(1e-4 * sim.abs().max()).float().mean().item()  # noqa: E731
    assert near(dep) >= 0.99 > near(fq)  # float rounding apart, the deployed model computes the integer graph
    # the residual adds and the conv outputs that feed them are rounded: hooks on blocks and layers
    assert q.layer1[0]._forward_hooks == {} and len(d.layer1[0]._forward_hooks) == 1
    assert len(d.layer1[0].conv2._forward_hooks) == 1
    # QLinearConv's int32 bias: the deployed copy's bias is a whole number of accumulator units
    m = d.layer1[0].conv2
    unit = Grid.of(m.act_quant).scale * m.w_step.flatten().double()
    units = m.bias.detach().double() / unit
    assert torch.allclose(units, units.round(), atol=1e-3)


def test_int8_and_qdq_files_compute_the_deployed_model(w4a4, tmp_path):
    q, plan = w4a4
    x = _images(128, seed=3)
    with torch.no_grad():
        dep = deployed(q, plan)(x)
    int8 = _ort(export_onnx(q, tmp_path / "m.int8.onnx", kernels="int8", plan=plan), x)
    qdq = _ort(export_onnx(q, tmp_path / "m.qdq.onnx", plan=plan), x)
    plain = _ort(export_onnx(q, tmp_path / "m.plain.onnx"), x)
    for out in (int8, qdq):
        assert (out.argmax(1) == dep.argmax(1)).float().mean() >= 0.99
        assert (out - dep).abs().le(1e-4 * dep.abs().max()).float().mean() >= 0.99
    assert (plain - dep).abs().le(1e-4 * dep.abs().max()).float().mean() < 0.9  # without the plan: fake-quant only


class _Inner(nn.Module):
    """A residual sum used inside the module that computes it: no module returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.a(x) + self.b(x))).mean((2, 3))


def test_an_add_no_module_returns_stays_float_and_the_file_still_computes_the_evaluated_model(tmp_path):
    torch.manual_seed(0)
    q = quantize(_Inner(), "rtn", calib=_images(32), w_bits=4, a_bits=4)
    plan = plan_integer(q, _images(32, seed=1))
    assert "add" not in plan.grids and {"a", "b"} <= set(plan.grids)  # the convs still write uint8
    x = _images(64, seed=2)
    with torch.no_grad():
        dep = deployed(q, plan)(x)
    out = _ort(export_onnx(q, tmp_path / "m.onnx", kernels="int8", plan=plan, input_shape=plan.input_shape), x)
    assert np.abs((out - dep).numpy()).max() <= 1e-4 * float(dep.abs().max())
