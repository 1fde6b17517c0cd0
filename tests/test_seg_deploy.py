"""Deployment of quantized segmentation models (deeplab_mini): ONNX QDQ and integer kernels exact
on every pixel against the integer simulation (dilated convs, Concat, Resize), mIoU from
onnxruntime's outputs, the resize arithmetic, an emulated AVX2 CPU."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergeq.deploy import IntegerSimulation, export_onnx, ort_session, plan_integer
from mergeq.deploy.check import check_int8_export
from mergeq.deploy.emulate import AVX2_CPU, qemu, run_emulated
from mergeq.deploy.resize import ResizeSpec, codes_resize_onnx
from mergeq.eval.segmentation import intersect_and_union, scores_from_areas
from mergeq.merge import merge
from mergeq.models import deeplab_mini
from mergeq.ptq import quantize

from .conftest import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
C = 5


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _miou(pred: np.ndarray, labels: torch.Tensor) -> float:
    inter, union, _, label = intersect_and_union(torch.from_numpy(pred), labels, C)
    return scores_from_areas(inter, union, label)["miou"]


@pytest.fixture(scope="module")
def experts():
    """Two W4A4 experts of one tiny deeplab_mini (the second's weights shifted), and their merge."""
    torch.manual_seed(0)
    fp = randomize_bn(deeplab_mini(C, width=8))
    other = copy.deepcopy(fp)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    qs = [quantize(m, "rtn", calib=_images(16, s), w_bits=4, a_bits=4) for s, m in enumerate((fp, other))]
    return {"expert": qs[0], "merged": merge(qs, rounding="nearest")}


# -- the resize arithmetic ------------------------------------------------------------------------------
def _resize_graph(spec: ResizeSpec, tmp_path, codes: bool, scale: float = 1.0, zp: int = 0):
    from onnx import TensorProto, helper

    from mergeq.deploy.onnx_graph import Graph

    g = Graph(21, True)
    out = codes_resize_onnx(g, "x", scale, zp, spec, "r", "y") if codes else spec.onnx(g, "x", "y")
    dtype = TensorProto.UINT8 if codes else TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", dtype, [None, None, *spec.in_size])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(g.nodes, "r", [x], [y], g.inits),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "resize.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(2, 30), st.integers(2, 30),
       st.sampled_from([("bilinear", False), ("bilinear", True), ("nearest", False)]))
def test_float_resize_matches_pytorch(tmp_path_factory, h, w, oh, ow, mode):
    spec = ResizeSpec(mode[0], mode[1], (h, w), (oh, ow))
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    out = _run(_resize_graph(spec, tmp_path_factory.mktemp("r"), codes=False), x)
    want = spec.interpolate(x).numpy()
    assert out.shape == want.shape and np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


@settings(max_examples=12, deadline=None)
@given(st.integers(-1, 3), st.integers(-1, 3), st.floats(1e-3, 2.0), st.sampled_from([0, 128]),
       st.sampled_from(["bilinear", "nearest"]), st.integers(0, 2 ** 31 - 1))
def test_codes_resize_is_bit_exact_at_power_of_two_ratios(tmp_path_factory, kh, kw, scale, zp, mode, seed):
    """DequantizeLinear(c, 1, z) -> Resize -> Mul(s) on onnxruntime equals the simulation's
    ``F.interpolate(c - z) * s`` bit for bit; the fake-quant model's ``F.interpolate((c - z) s)``
    differs by float rounding only."""
    scale = float(np.float32(scale))
    spec = ResizeSpec(mode, False, (8, 8), (int(8 * 2.0 ** kh), int(8 * 2.0 ** kw)))
    assert spec.exact_on_codes()
    c = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    out = _run(_resize_graph(spec, tmp_path_factory.mktemp("r"), True, scale, zp), c.to(torch.uint8))
    sim = (spec.interpolate(c.float() - zp) * scale).numpy()
    assert np.array_equal(out, sim)
    assert np.abs(spec.interpolate((c.float() - zp) * scale).numpy() - sim).max() <= 1e-6 * 255 * scale


def test_exact_on_codes_only_at_power_of_two_ratios_without_align_corners():
    assert ResizeSpec("bilinear", False, (8, 4), (32, 2)).exact_on_codes()
    assert not ResizeSpec("bilinear", False, (5, 5), (9, 9)).exact_on_codes()
    assert not ResizeSpec("bilinear", True, (8, 8), (16, 16)).exact_on_codes()
    assert not ResizeSpec("nearest", False, (1, 1), (256, 256)).exact_on_codes()  # weights beyond float32's bits


# -- the quantized model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["daformer", "aspp"])
def test_qdq_export_is_the_fake_quant_model(head, tmp_path):
    torch.manual_seed(1)
    q = quantize(randomize_bn(deeplab_mini(C, width=8, head=head)), "rtn", calib=_images(16, 0), w_bits=4, a_bits=4)
    x = _images(4, 5)
    with torch.no_grad():
        want = q(x).numpy()
    out = _run(export_onnx(q, tmp_path / "qdq.onnx"), x)
    assert out.shape == (4, C, 32, 32) and np.abs(out - want).max() < 1e-5
    assert np.array_equal(out.argmax(1), want.argmax(1))


@pytest.mark.parametrize("which", ["expert", "merged"])
def test_int8_export_is_exact_on_every_pixel(experts, which, tmp_path):
    q = experts[which]
    plan = plan_integer(q, _images(32, 2))
    path = export_onnx(q, tmp_path / "int8.onnx", kernels="int8", plan=plan)
    x = _images(8, 7)
    out, sim = _run(path, x), IntegerSimulation(q, plan)(x).numpy()
    assert out.shape == (8, C, 32, 32) and np.array_equal(out, sim)  # bit for bit, so every pixel's argmax
    with torch.no_grad():
        labels = q(x).argmax(1)
    labels[:, ::7] = 255  # some ignored pixels
    assert _miou(out.argmax(1), labels) == _miou(sim.argmax(1), labels)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Resize") == 4 and ops.count("Concat") >= 1  # 3 head embeddings and the logits
    dilations = {tuple(a.ints) for n in graph.node if n.op_type == "QLinearConv" for a in n.attribute
                 if a.name == "dilations"}
    assert {(1, 1), (2, 2), (4, 4)} <= dilations
    inits = {i.name: i for i in graph.initializer}
    resized = [n for n in graph.node if n.op_type == "Resize"]
    producers = {o: n for n in graph.node for o in n.output}
    assert all(producers[r.input[0]].op_type == "DequantizeLinear"  # on the codes: DequantizeLinear(c, 1, z)
               and onnx.numpy_helper.to_array(inits[producers[r.input[0]].input[1]]) == 1.0 for r in resized)


def test_export_check_reports_pixels(experts, tmp_path):
    q = experts["merged"]
    plan = plan_integer(q, _images(32, 2))
    path = export_onnx(q, tmp_path / "int8.onnx", kernels="int8", plan=plan)
    check = check_int8_export(q, path, plan, _images(8, 3), rounds=1)
    assert check.dense and check.agree_simulation == 1.0 and check.max_diff_simulation == 0.0
    assert "agrees with its simulation on 100.00% of pixels" in check.report()[0][0]


def test_a_resize_of_another_ratio_runs_in_float_and_says_so(experts, tmp_path, caplog):
    q = experts["expert"]
    x = _images(8, 4, size=36)  # stride 4: 9 x 9, stride 8: 5 x 5; 9 / 5 is no power of two
    plan = plan_integer(q, x)
    with caplog.at_level(logging.WARNING, logger="mergeq.deploy.onnx_export"):
        path = export_onnx(q, tmp_path / "int8.onnx", kernels="int8", plan=plan, input_shape=["N", 3, 36, 36])
    assert "is not a power-of-two ratio" in caplog.text
    out, sim = _run(path, x), IntegerSimulation(q, plan)(x).numpy()
    assert out.shape == (8, C, 36, 36) and np.abs(out - sim).max() < 1e-3


@pytest.mark.skipif(qemu() is None, reason="needs QEMU's user-mode emulator (apt-get install qemu-user)")
def test_int8_export_is_exact_on_an_emulated_avx2_cpu(experts, tmp_path):
    jobs, sims = [], []
    x = _images(4, 9)
    for name, q in experts.items():
        plan = plan_integer(q, _images(32, 2))
        jobs.append((export_onnx(q, tmp_path / f"{name}.onnx", kernels="int8", plan=plan), x.numpy()))
        sims.append(IntegerSimulation(q, plan)(x).numpy())
    for out, sim in zip(run_emulated(jobs, cpu=AVX2_CPU), sims):
        assert np.array_equal(out, sim)
