"""ONNX export on onnxruntime's integer kernels, its PyTorch simulation, the ViT, and the CLI per architecture."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from mergeq.cli import main
from mergeq.deploy import ExportError, IntegerPlan, IntegerSimulation, export_onnx, ort_session, plan_integer, to_onnx
from mergeq.deploy.emulate import AVX2_CPU, qemu, run_emulated
from mergeq.deploy.integer import Grid, qadd_codes, saturation_free
from mergeq.deploy.requant import deployed
from mergeq.models import ARCHITECTURES, build_model, resnet8, vit_tiny
from mergeq.nn import quant_modules
from mergeq.ptq import quantize
from mergeq.checkpoint import save_model
from mergeq.sysinfo import cpu as cpu_info

from .conftest import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
               "MatMulNBits", "DynamicQuantizeMatMul"}
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "DequantizeLinear"}


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["mergeq"])


# -- the arithmetic ------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.floats(1e-4, 10.0), st.sampled_from([0, 128]), st.integers(2, 8))
def test_grid_codes_round_trip(scale, zp, bits):
    grid = Grid(float(np.float32(scale)), zp)
    q = torch.arange(256, dtype=torch.float32)
    assert torch.equal(grid.codes(grid.dequantize(q)), q)
    lo, hi = (128 - 2 ** (bits - 1), 127 + 2 ** (bits - 1)) if zp else (0, 2 ** bits - 1)
    narrow = Grid(grid.scale, zp, lo, hi)  # a b-bit layer input: Clip, then QuantizeLinear
    assert torch.equal(narrow.quantize(grid.dequantize(q)), q.clamp(lo, hi))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-3, 1.0), min_size=3, max_size=3), st.lists(st.sampled_from([0, 128]), min_size=3,
       max_size=3), st.integers(0, 2**31 - 1))
def test_qlinear_add_simulation_is_exact(scales, zps, seed):
    """QLinearAdd on onnxruntime equals qadd_codes code for code (every pair of codes, random grids)."""
    from onnx import TensorProto, helper, numpy_helper

    ga, gb, gc = (Grid(float(np.float32(s)), z) for s, z in zip(scales, zps))
    a = torch.arange(256.0).repeat_interleave(256)
    b = torch.arange(256.0).repeat(256)[torch.randperm(65536, generator=torch.Generator().manual_seed(seed))]
    consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in [
        ("sa", ga.scale, np.float32), ("za", ga.zero_point, np.uint8), ("sb", gb.scale, np.float32),
        ("zb", gb.zero_point, np.uint8), ("sc", gc.scale, np.float32), ("zc", gc.zero_point, np.uint8)]]
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain="com.microsoft")
    inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, [65536]) for n in "ab"]
    output = helper.make_tensor_value_info("c", TensorProto.UINT8, None)
    graph = helper.make_graph([node], "g", inputs, [output], consts)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"a": a.numpy().astype(np.uint8), "b": b.numpy().astype(np.uint8)})[0]
    assert np.array_equal(out, qadd_codes(a, ga, b, gb, gc).numpy().astype(np.uint8))


# -- CNNs: integer graph == simulation, and only integer kernels -----------------------------------------
@pytest.fixture(scope="module")
def fp_resnet(one_thread) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(resnet8())


def _integer_kernel_report(path, tmp_path, model: nn.Module) -> dict[str, set[str]]:
    """For each quantized layer, the ops of the graph onnxruntime optimized and runs that read its weights."""
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized_path=optimized)
    graph = onnx.load(str(optimized)).graph
    report = {}
    for name, _ in quant_modules(model):
        base = name.replace(".", "_")
        weights = {f"{base}_w_codes", f"{base}_w_blocks"}
        report[name] = {n.op_type for n in graph.node if weights & set(n.input)}
    report["*"] = {n.op_type for n in graph.node}
    return report


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8), (2, 3)])
def test_int8_resnet_runs_integer_kernels_and_matches_its_simulation(fp_resnet, tmp_path, w_bits, a_bits):
    q = quantize(fp_resnet, "rtn", calib=_images(64), w_bits=w_bits, a_bits=a_bits)
    plan = plan_integer(q, _images(64, seed=1))
    path = export_onnx(q, tmp_path / "m.onnx", kernels="int8", plan=plan)
    x = _images(96, seed=2)
    out, sim = _run(path, x), _predict(IntegerSimulation(q, plan), x)
    assert np.array_equal(out.argmax(1), sim.argmax(1)) and np.abs(out - sim).max() < 1e-4
    assert IntegerPlan.from_json(_metadata(path)["integer_plan"]) == plan
    report = _integer_kernel_report(path, tmp_path, q)
    for name, _ in quant_modules(q):
        assert report[name] and report[name] <= INTEGER_OPS, (name, report[name])
    assert not report["*"] & FLOAT_OPS - {"DequantizeLinear"}, report["*"]  # no float Conv/Gemm/MatMul at all
    # the requantization costs little against the fake-quant model (random weights: near-tied logits)
    assert (out.argmax(1) == _predict(q, x).argmax(1)).mean() >= (0.97 if a_bits == 8 else 0.8)


def test_int8_general_models(any_model, images, tmp_path):
    q = quantize(any_model, "rtn", calib=images, w_bits=4, a_bits=8)
    path = export_onnx(q, tmp_path / "m.onnx", kernels="int8", calib=images)
    plan = IntegerPlan.from_json(_metadata(path)["integer_plan"])
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    out, sim = _run(path, x), _predict(IntegerSimulation(q, plan), x)
    assert np.array_equal(out.argmax(1), sim.argmax(1)) and np.abs(out - sim).max() < 1e-4
    report = _integer_kernel_report(path, tmp_path, q)
    assert all(report[n] and report[n] <= INTEGER_OPS for n, _ in quant_modules(q)), report


def test_plan_reuses_consumer_grids_and_calibrates_the_rest(fp_resnet):
    q = quantize(fp_resnet, "rtn", calib=_images(64), w_bits=4, a_bits=4)
    grids = plan_integer(q, _images(64)).grids
    conv2_in = Grid.of(q.layer1[0].conv2.act_quant)
    # conv1 -> (folded BN) -> ReLU -> conv2: one consumer, so conv1 writes conv2's own grid, unsigned
    assert grids["layer1_0_conv1"] == conv2_in.full() and grids["layer1_0_conv1"].zero_point == 0
    # conv2 feeds the residual add: a calibrated signed 8-bit grid; the add feeds the next block
    assert grids["layer1_0_conv2"].zero_point == 128 and "add" in grids
    # the stem feeds layer1.0.conv1 (4-bit input) and the residual add: calibrated, not the 4-bit grid
    assert grids["relu"].scale != Grid.of(q.layer1[0].conv1.act_quant).scale
    q8 = quantize(fp_resnet, "rtn", calib=_images(64), w_bits=4, a_bits=8)
    grids8 = plan_integer(q8, _images(64)).grids  # an 8-bit consumer's grid is reused for the residual too
    assert grids8["relu"] == Grid.of(q8.layer1[0].conv1.act_quant)


# -- every x86 kind: weights that cannot saturate without VNNI --------------------------------------------
def _dot_without_vnni(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """uint8 x int8 dot products ``a @ w`` as x86 computes them without VNNI (vpmaddubsw): two
    adjacent products summed into an int16 with saturation, then the pairs summed in int32."""
    p = a[:, :, None].astype(np.int64) * w[None].astype(np.int64)  # [M, K, N]
    pairs = np.clip(p[:, 0::2] + p[:, 1::2], -32768, 32767)
    return pairs.sum(1)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(1, 255), st.integers(0, 2**31 - 1))
def test_saturation_free_layers_are_exact_without_vnni(w_bits, hi, seed):
    rng = np.random.default_rng(seed)
    lo_w, hi_w = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    w = rng.integers(lo_w, hi_w + 1, size=(16, 8))
    w[:2, 0] = lo_w  # the extremes, against the largest input code
    a = rng.integers(0, hi + 1, size=(4, 16))
    a[0] = hi
    grid = Grid(1.0, 0, 0, hi)
    if saturation_free(torch.from_numpy(w), grid):
        assert np.array_equal(_dot_without_vnni(a, w), a @ w)
    else:
        assert 2 * hi * np.abs(w).max() > 32767
    if w_bits == 8 and hi == 255:  # 8-bit weights against 8-bit inputs: saturation is reachable
        assert not saturation_free(torch.from_numpy(w), grid)
        assert not np.array_equal(_dot_without_vnni(a, w), a @ w)


def _weight_dtypes(path) -> dict[str, int]:
    return {i.name[: -len("_w_codes")]: i.data_type for i in onnx.load(str(path)).graph.initializer
            if i.name.endswith("_w_codes")}


def test_int8_export_stores_8_bit_layers_as_uint8_unless_the_target_has_vnni(fp_resnet, tmp_path):
    q = quantize(fp_resnet, "rtn", calib=_images(64), w_bits=4, a_bits=4)  # first and last layer 8 bits
    plan = plan_integer(q, _images(64, seed=1))
    x = _images(32, seed=2)
    sim = _predict(IntegerSimulation(q, plan), x)
    for target in ("any", "vnni"):
        path = export_onnx(q, tmp_path / f"{target}.onnx", kernels="int8", plan=plan, target_cpu=target)
        types, meta = _weight_dtypes(path), _metadata(path)
        eight = {n.replace(".", "_") for n, m in quant_modules(q) if m.w_bits == 8}
        assert eight == {"conv1", "fc"}
        for name, dtype in types.items():
            unsigned = target == "any" and name in eight
            assert dtype == (onnx.TensorProto.UINT8 if unsigned else onnx.TensorProto.INT8), (target, name)
        assert meta["target_cpu"] == target and set(meta["integer_weights"].values()) == (
            {"int8", "uint8"} if target == "any" else {"int8"})
        if target == "any" or cpu_info()["vnni"]:  # exact here; without VNNI only the safe form is
            assert np.abs(_run(path, x) - sim).max() < 1e-4
    with pytest.raises(ExportError, match="target_cpu must be one of"):
        to_onnx(q, kernels="int8", plan=plan, target_cpu="avx2")


@pytest.mark.skipif(qemu() is None, reason="needs QEMU's user-mode emulator (apt-get install qemu-user)")
def test_int8_exports_are_exact_on_an_emulated_avx2_cpu_without_vnni(fp_resnet, vit, tmp_path):
    """On an AVX2 CPU without VNNI (QEMU's Haswell) the default export equals its simulation; int8
    weights in the 8-bit layers do not (the control: the emulated CPU really lacks VNNI)."""
    jobs, sims = [], []
    for name, model, w_bits, a_bits, target in [("r88", fp_resnet, 8, 8, "any"), ("r44", fp_resnet, 4, 4, "any"),
                                                 ("vit", vit, 4, 8, "any"), ("r88vnni", fp_resnet, 8, 8, "vnni")]:
        q = quantize(model, "rtn", calib=_images(64), w_bits=w_bits, a_bits=a_bits)
        plan = plan_integer(q, _images(64, seed=1))
        path = export_onnx(q, tmp_path / f"{name}.onnx", kernels="int8", plan=plan, target_cpu=target)
        x = _images(64, seed=2)
        jobs.append((path, x.numpy()))
        sims.append(_predict(IntegerSimulation(q, plan), x))
    outs = run_emulated(jobs, cpu=AVX2_CPU)
    for out, sim in zip(outs[:3], sims):
        assert np.array_equal(out.argmax(1), sim.argmax(1)) and np.abs(out - sim).max() < 1e-4
    assert np.abs(outs[3] - sims[3]).max() > 1e-3  # int8 8-bit weights saturate there


def test_int8_export_names_the_layers_left_in_float(fp_resnet, tmp_path, caplog):
    """Issue 24: a layer without an integer kernel ran in float in the int8 graph without a word."""
    q = quantize(fp_resnet, "rtn", calib=_images(64), w_bits=4, a_bits=4)
    q.layer1[0].conv1.act_quant = None  # weight-only: no integer kernel takes a float input
    with caplog.at_level("WARNING", logger="mergeq.deploy.onnx_export"):
        path = export_onnx(q, tmp_path / "m.onnx", kernels="int8", calib=_images(64))
    assert "1 of 10 quantized layers have no integer kernel and run in float" in caplog.text
    assert "layer1.0.conv1" in caplog.text and _metadata(path)["layer_ops"]["layer1.0.conv1"] == "Conv"


def test_export_check_chooses_the_faster_exact_form():
    from mergeq.deploy.check import ExportCheck

    check = lambda agree, int8, qdq: ExportCheck(64, agree, 0.0, 1.0, int8, 10.0, qdq, "cpu")  # noqa: E731
    assert check(1.0, 5.0, 8.0).choice()[0] == "int8" and "1.60x as fast" in check(1.0, 5.0, 8.0).choice()[1]
    assert check(1.0, 9.0, 6.0).choice() == ("qdq", "the QDQ form is 1.50x as fast as the integer kernels on this CPU")
    assert check(0.98, 1.0, 6.0).choice() == ("qdq", "the integer kernels are not exact on this CPU")
    # exact and faster, but not the evaluated model: auto keeps the QDQ form and says why (issue 31)
    below = ExportCheck(64, 1.0, 0.0, 0.99, 5.0, 10.0, 8.0, "cpu")
    assert below.choice() == ("qdq", "the integer model agrees with the evaluated model on 99.00% of images, "
                                     "under 99.5%")
    lines, warnings = check(0.98, 20.0, 6.0).report()
    assert "agrees with its simulation on 98.00%" in lines[0] and "2.00x" not in lines[1]
    assert any("not compute the simulated model exactly" in w for w in warnings)
    assert any("slower than onnxruntime's FP32" in w for w in warnings)


# -- the ViT and weight-only Linear layers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vit(one_thread) -> nn.Module:
    torch.manual_seed(0)
    return vit_tiny(patch=8, depth=2)


def test_vit_exports_in_both_forms(vit, tmp_path):
    q = quantize(vit, "rtn", calib=_images(64), w_bits=4, a_bits=8)
    x = _images(64, seed=3)
    ref = _predict(q, x)
    qdq = _run(export_onnx(q, tmp_path / "qdq.onnx"), x)
    # float LayerNorm/softmax/GELU differ in the last bits and can move an 8-bit rounding: no exact match
    assert np.array_equal(qdq.argmax(1), ref.argmax(1)) and np.abs(qdq - ref).max() < 0.05
    plan = plan_integer(q, _images(64, seed=1))
    path = export_onnx(q, tmp_path / "int8.onnx", kernels="int8", plan=plan)
    out, sim = _run(path, x), _predict(IntegerSimulation(q, plan), x)
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.98 and np.abs(out - sim).max() < 0.05
    report = _integer_kernel_report(path, tmp_path, q)
    assert all(report[n] <= INTEGER_OPS and report[n] for n, _ in quant_modules(q)), report
    # LayerNorm, softmax, GELU and the attention products stay float
    assert {"LayerNormalization", "Softmax"} <= report["*"] and report["*"] & {"Gelu", "BiasGelu"}
    assert _metadata(path)["layer_ops"]["blocks.0.fc1"] == "MatMulIntegerToFloat"


@pytest.mark.parametrize("group_size,act_order", [(None, False), (16, False), (16, True)])
def test_weight_only_linear_layers_use_matmul_nbits(vit, tmp_path, group_size, act_order):
    q = quantize(vit, "gptq", calib=_images(64), w_bits=4, a_bits=None, group_size=group_size, act_order=act_order)
    x = _images(32, seed=4)
    ref = _predict(q, x)
    for kernels in ("qdq", "int8"):
        out = _run(export_onnx(q, tmp_path / f"{kernels}.onnx", kernels=kernels), x)
        assert np.array_equal(out.argmax(1), ref.argmax(1)) and np.abs(out - ref).max() < 1e-4, kernels
    ops = _metadata(tmp_path / "int8.onnx")["layer_ops"]
    linears = [n for n, m in quant_modules(q) if m.kind == "linear" and not (act_order and m.w_bits > 4)]
    assert linears and all(ops[n] == "MatMulNBits" for n in linears), ops  # 8-bit act-order: no g_idx kernel
    report = _integer_kernel_report(tmp_path / "int8.onnx", tmp_path, q)
    assert all(report[n] == {"MatMulNBits"} for n in linears), report


# -- API errors and the float reference ----------------------------------------------------------------
def test_fp32_export_and_kernel_errors(fp_resnet, tmp_path):
    x = _images(32, seed=5)
    out = _run(export_onnx(fp_resnet, tmp_path / "fp.onnx", kernels="fp32"), x)
    assert np.abs(out - _predict(fp_resnet, x)).max() < 1e-4
    q = quantize(fp_resnet, "rtn", calib=_images(32), w_bits=4, a_bits=4)
    with pytest.raises(ExportError, match="fp32"):
        to_onnx(q, kernels="fp32")
    with pytest.raises(ExportError, match="kernels must be one of"):
        to_onnx(q, kernels="int4")
    with pytest.raises(ExportError, match="calibration"):
        to_onnx(q, kernels="int8")
    with pytest.raises(ExportError, match="kernels='fp32' has none"):
        to_onnx(fp_resnet, kernels="fp32", calib=_images(8))
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))  # weight-only Conv2d: no kernel
    weight_only = quantize(convs, "rtn", calib=_images(32), w_bits=4, a_bits=None)
    with pytest.raises(ExportError, match="no layer of this model has an integer kernel"):
        to_onnx(weight_only, kernels="int8")


# -- the command line, for every registered architecture ------------------------------------------------
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "resnet20" else a
                                  for a in sorted(ARCHITECTURES) if a != "deeplab_r101"])
# resnet20: as resnet8, 4x the compute; deeplab_r101: deeplab_mini's code at the paper's scale (45M parameters)
def test_cli_exports_every_architecture(arch, tmp_path, capsys):
    kwargs = {"patch": 8, "depth": 1} if arch == "vit_tiny" else {}
    torch.manual_seed(0)
    q = quantize(build_model(arch, 10, **kwargs), "rtn", calib=_images(64), w_bits=4, a_bits=8)
    meta = {"arch": arch, "num_classes": 10, "arch_kwargs": kwargs, "benchmark": "digits", "seed": 0,
            "domain": "uci", "method": "rtn", "bits": "W4A8"}
    ckpt = save_model(q, tmp_path / "q.safetensors", meta)
    x = _images(32, seed=6)
    for kernels in ("qdq", "int8"):
        out_path = tmp_path / f"{kernels}.onnx"
        calib = ["--calib-size", "128"] if kernels == "int8" else []
        capsys.readouterr()
        assert main(["export", "--model", str(ckpt), "--format", "onnx", "--kernels", kernels, *calib,
                     "--out", str(out_path)]) == 0
        printed = capsys.readouterr().out
        if kernels == "int8":  # the check on this CPU: exact against the simulation, a latency ratio
            assert "128 calibration images: agrees with its simulation on 100.00%" in printed, printed
            assert "onnxruntime FP32 of the same weights" in printed
        info = _metadata(out_path)
        assert info["arch"] == arch and info["kernels"] == kernels
        plan = IntegerPlan.from_json(info["integer_plan"])  # the QDQ form rounds where the integer graph does
        ref = deployed(q, plan) if kernels == "qdq" else IntegerSimulation(q, plan)
        out = _run(out_path, x)
        dense_float = kernels == "qdq" and out.ndim == 4  # float rounding may flip a near-tie among 32k pixels
        assert (out.argmax(1) == _predict(ref, x).argmax(1)).mean() >= (
            0.95 if arch == "vit_tiny" else 0.999 if dense_float else 1.0)
    if arch == "resnet8":  # auto: the faster of the two forms that compute the evaluated model here
        assert main(["export", "--model", str(ckpt), "--format", "onnx", "--kernels", "auto", "--calib-size", "64",
                     "--out", str(tmp_path / "auto.onnx")]) == 0
        chosen = re.search(r"--kernels auto: (int8|qdq), ", capsys.readouterr().out).group(1)
        assert _metadata(tmp_path / "auto.onnx")["kernels"] == chosen
    if arch == "resnet8":  # options that would be ignored are refused
        for extra in (["--format", "safetensors", "--kernels", "int8"], ["--format", "safetensors", "--calib-size", "64"],
                      ["--format", "onnx", "--target-cpu", "any"]):
            assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "x"), *extra]) == 2


def test_a_recalibrated_merge_exports_exactly(fp_resnet, tmp_path):
    """merge.recalibrate changes per-channel weight steps, biases and activation steps, never the
    codes: the merged model still exports to integer kernels that match its simulation."""
    from mergeq import merge
    from mergeq.merge.recalibrate import recalibrate

    calib = [_images(48, seed=s) * (1 + 0.3 * s) for s in range(2)]
    experts = [quantize(fp_resnet, "rtn", calib=x, w_bits=4, a_bits=4) for x in calib]
    q = recalibrate(merge(experts), experts, calib, "bn+act")
    assert all(m.on_grid() for _, m in quant_modules(q))
    plan = plan_integer(q, _images(64, seed=1))
    path = export_onnx(q, tmp_path / "m.onnx", kernels="int8", plan=plan)
    x = _images(64, seed=2)
    out, sim = _run(path, x), _predict(IntegerSimulation(q, plan), x)
    assert np.array_equal(out.argmax(1), sim.argmax(1)) and np.abs(out - sim).max() < 1e-4
