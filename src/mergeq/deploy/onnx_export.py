"""ONNX export of a model (quantized or not), built directly with ``onnx.helper``.

The model is traced with ``torch.fx`` (QuantModules kept as leaves, :mod:`.trace`) and each node
is translated: quantized layers here, every other op in :mod:`.onnx_ops`. ``kernels`` picks
what onnxruntime's CPU provider runs:

* ``"qdq"`` (default): a QDQ graph that onnxruntime runs in float and that reproduces the
  PyTorch fake-quant model to float rounding;
* ``"int8"``: integer kernels (QLinearConv, ConvInteger, MatMulIntegerToFloat, QLinearAdd;
  MatMulNBits for weight-only Linear layers) with requantization between layers, calibrated
  on images (:mod:`.integer`, :mod:`.onnx_integer`); :class:`~.integer.IntegerSimulation` is
  its PyTorch twin;
* ``"fp32"``: a model without QuantModules, all in float (the reference for speed).

We do not use ``torch.onnx.export``: its default (dynamo) exporter needs ``onnxscript``, and the
legacy TorchScript exporter (``dynamo=False``) refuses fake-quant ranges other than (0, 127),
(0, 255) and (-128, 127) (a 4-bit (-8, 7) raises), exports a QuantizeLinear on the float weight
rather than an integer initializer, and has no INT4. Writing the graph ourselves gives exact
control of what lands in the file.

QDQ form, per QuantModule:

* **weights**: the integer codes are an initializer, INT4 when ``w_bits <= 4`` and the opset is
  >= 21 (two codes per byte; onnxruntime's CPU DequantizeLinear takes INT4 since
  microsoft/onnxruntime#20362, i.e. 1.19; checked on 1.32), INT8 otherwise or with
  ``int4=False``. A ``DequantizeLinear`` with the per-output-channel steps (``axis=0``, zero
  point 0) feeds Conv/Gemm (MatMul for inputs of rank > 2); ``code * step`` in float32 is
  exactly PyTorch's dequantized weight. Grouped steps (GPTQ ``group_size``) dequantize the
  ``[C, n]`` code matrix blockwise (``block_size``, opset 21) when the groups are contiguous
  blocks, else multiply it by the steps gathered with the column groups (:mod:`.groups`).
* **input activations** (per tensor, zero point 0): ``Clip(lo*s, hi*s) -> QuantizeLinear ->
  DequantizeLinear`` with an INT8 (signed grid) or UINT8 (unsigned) zero point. A b-bit grid
  ``[lo, hi]`` with b < 8 is a subset of the 8-bit range, so the Clip restricts the 8-bit
  quantizer to it: ``round(clip(x, lo*s, hi*s) / s) = clamp(round(x / s), lo, hi)``, i.e. the
  same values as PyTorch's fake quantization (the Clip is left out at 8 bits, where saturation
  does it). INT4/UINT4 activations (opset 21) would only cover b = 4, so one rule serves 2..8.

Biases and unfolded BatchNorm parameters stay float32. A bias is a separate ``Add`` after the
Conv/Gemm, not its third input: onnxruntime's QDQ optimizer rewrites a float bias input of a
Conv fed by DequantizeLinear into an int32 bias with scale ``s_x * s_w`` (lossy), which flipped
some downstream activation roundings; with the Add the graph matches PyTorch to float rounding
at every optimization level. onnxruntime runs the QDQ Conv/Gemm in float on dequantized inputs
(the layers have no output quantizer, so there is nothing to fuse into QLinearConv): that is
what ``kernels="int8"`` adds.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from ..io import atomic_write_bytes
from ..nn.qmodule import QuantModule, quant_modules
from .groups import contiguous_block, weight_groups
from .integer import (Grid, IntegerPlan, _Roles, accumulator_scale, is_integer_layer, plan_integer,
                      resolve_target_cpu, weight_codes)
from .onnx_graph import Graph, f32
from .onnx_integer import dequantize, integer_layer, matmul_nbits, qlinear_add
from .onnx_ops import Static, translate_call, translate_module
from .pack import ExportError
from .requant import accumulator_bias
from .packed import check_exportable, packed_metadata
from .resize import codes_resize_onnx, is_resize, resize_spec
from .trace import node_facts, trace

log = logging.getLogger(__name__)
MIN_OPSET, DEFAULT_OPSET, INT4_OPSET = 13, 21, 21
KERNELS = ("qdq", "int8", "fp32")


def weight_storage(w_bits: int, opset: int, int4: bool = True) -> str:
    """``'int4'`` or ``'int8'``: how a ``w_bits`` weight is stored at ``opset`` in the QDQ form."""
    return "int4" if int4 and w_bits <= 4 and opset >= INT4_OPSET else "int8"


def infer_input_shape(gm: fx.GraphModule) -> list[int | str]:
    """``[N, C, H, W]`` (or ``[N, F]``) from the layer that consumes the input directly."""
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    readers = [u for u in ph.users if not (u.op == "call_function" and u.target is getattr)]  # x.shape: no data
    users = [u for u in readers if u.op == "call_module"]
    if len(readers) == 1 and users:
        m = gm.get_submodule(users[0].target)
        if isinstance(m, QuantModule) and m.kind == "conv":
            return ["N", m.weight.shape[1] * m.conv_kwargs["groups"], "H", "W"]
        if isinstance(m, nn.Conv2d):
            return ["N", m.in_channels, "H", "W"]
        if isinstance(m, (QuantModule, nn.Linear)):
            return ["N", m.weight.shape[1]]
    raise ExportError("cannot infer the model's input shape; pass input_shape, e.g. ['N', 3, 32, 32]")


class _Exporter:
    """State of one export: the graph, the traced facts and, per node, its ONNX value."""

    def __init__(self, gm: fx.GraphModule, g: Graph, facts: dict, kernels: str, plan: IntegerPlan | None,
                 target_cpu: str = "any") -> None:
        self.gm, self.g, self.facts, self.kernels, self.target_cpu = gm, g, facts, kernels, target_cpu
        self.grids = dict(plan.grids) if plan is not None and kernels == "int8" else {}
        self.requant: dict[str, Any] = {}  # QDQ form of a plan: producer -> the grid its output is rounded to
        if plan is not None and kernels == "qdq" and plan.grids:
            roles = _Roles(gm, facts)
            self.requant = {n.name: plan.grids[n.name] for n in gm.graph.nodes
                            if n.name in plan.grids and roles.is_producer(n)}
        self.env: dict[str, Any] = {}
        self.codes_memo: dict = {}
        self._float: dict[str, str] = {}
        self.layer_ops: dict[str, str] = {}  # quantized layer -> the op that multiplies
        self.weight_types: dict[str, str] = {}  # integer layer -> int8 | uint8 weight codes

    def float_arg(self, a: Any) -> Any:
        """An argument as the translators take it: float tensor names (uint8 ones dequantized)."""
        if isinstance(a, fx.Node):
            if a.name in self.grids:
                if a.name not in self._float:
                    self._float[a.name] = dequantize(self, self.env[a.name], self.grids[a.name], a.name)
                return self._float[a.name]
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.float_arg(x) for x in a)
        return a

    @staticmethod
    def conv_attrs(kw: dict, kernel: Sequence[int]) -> dict:
        pad, dil = kw["padding"], tuple(kw["dilation"])
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0, 0)
            else:  # 'same' (stride 1): torch pads the extra element at the end
                totals = [d * (k - 1) for d, k in zip(dil, kernel)]
                return dict(kernel_shape=list(kernel), strides=list(kw["stride"]), dilations=list(dil),
                            group=kw["groups"], pads=[t // 2 for t in totals] + [t - t // 2 for t in totals])
        return dict(kernel_shape=list(kernel), strides=list(kw["stride"]), dilations=list(dil),
                    group=kw["groups"], pads=list(pad) * 2)

    # -- QDQ / float layers ----------------------------------------------------------------------
    def _act_qdq(self, x: str, m: QuantModule, base: str) -> str:
        g, aq = self.g, m.act_quant
        s = float(aq.step.detach().abs().clamp_min(1e-8))  # the step ActQuantizer.forward uses
        signed = bool(aq.signed)
        lo, hi = (-(2 ** (aq.bits - 1)), 2 ** (aq.bits - 1) - 1) if signed else (0, 2 ** aq.bits - 1)
        if (lo, hi) != ((-128, 127) if signed else (0, 255)):
            x = g.op("Clip", [x, g.const(f"{base}_clip_lo", np.float32(lo) * np.float32(s)),
                              g.const(f"{base}_clip_hi", np.float32(hi) * np.float32(s))])
        scale = g.const(f"{base}_a_scale", f32(s))
        zp = g.const(f"{base}_a_zp", np.array(0, dtype=np.int8 if signed else np.uint8))
        q = g.op("QuantizeLinear", [x, scale, zp], g.name(f"{base}_a_q"))
        return g.op("DequantizeLinear", [q, scale, zp], g.name(f"{base}_a_dq"))

    def _dq_weight(self, m: QuantModule, base: str) -> str:
        """The float weight ``codes * w_step`` as DequantizeLinear of integer codes."""
        g = self.g
        codes = weight_codes(m).numpy()
        int4 = weight_storage(m.w_bits, g.opset, g.int4) == "int4"
        steps, g_idx = weight_groups(m)
        if g_idx is None:
            wq = g.int_codes(f"{base}_w_codes", codes, int4)
            return g.op("DequantizeLinear", [wq, g.const(f"{base}_w_scale", steps.flatten().numpy())],
                        g.name(f"{base}_w"), axis=0)
        c = codes.shape[0]
        wq = g.int_codes(f"{base}_w_codes", codes.reshape(c, -1), int4)
        block = contiguous_block(g_idx)
        if block is not None and g.opset >= 21:
            w = g.op("DequantizeLinear", [wq, g.const(f"{base}_w_scale", steps.numpy())], axis=1, block_size=block)
        else:
            full = g.op("Gather", [g.const(f"{base}_w_scale", steps.numpy()),
                                   g.const(f"{base}_w_group", g_idx.numpy())], axis=1)
            w = g.op("Mul", [g.op("DequantizeLinear", [wq, g.const("one_scale", f32(1.0))]), full])
        return g.op("Reshape", [w, g.const(f"{base}_w_shape", np.array(codes.shape, np.int64))], g.name(f"{base}_w"))

    def float_layer(self, node: fx.Node, m: nn.Module) -> str:
        """Conv, Gemm (2-D input) or MatMul for a QuantModule (QDQ) or a plain Conv2d/Linear (float)."""
        g, base, out = self.g, node.target, node.name
        x = self.float_arg(node.args[0])
        quantized = isinstance(m, QuantModule)
        conv = m.kind == "conv" if quantized else isinstance(m, nn.Conv2d)
        matmul = not conv and len(self.facts[node.args[0].name].values[0]) != 2
        if quantized:
            if m.act_quant is not None and m.quant_act:
                x = self._act_qdq(x, m, base)
            if self.kernels == "int8" and not conv and (m.act_quant is None or not m.quant_act):
                y = matmul_nbits(self, x, m, base, out)
                if y is not None:
                    self.layer_ops[base] = "MatMulNBits"
                    return y
            w = self._dq_weight(m, base)
            w = g.op("Transpose", [w], perm=[1, 0]) if matmul else w
            kw = m.conv_kwargs if conv else None
            self.layer_ops[base] = "Conv" if conv else "Gemm"
        else:
            value = m.weight.detach().cpu().float().numpy()
            w = g.const(f"{base}_w", value.T if matmul else value)  # MatMul takes [in, out]
            kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups) if conv else None
        shape = tuple(m.weight.shape)
        bias = None if m.bias is None else m.bias.detach().cpu().float().numpy()
        if bias is not None and node.name in self.requant:  # QLinearConv's int32 bias (.requant)
            bias = accumulator_bias(m, accumulator_scale(m, Grid.of(m.act_quant))).numpy()
        # QDQ keeps the bias a separate float Add: onnxruntime re-quantizes a Conv's bias input to int32 (lossy)
        inline = bias is not None and not quantized and not matmul
        ins = [x, w] + ([g.const(f"{base}_b", bias)] if inline else [])
        y = out if bias is None or inline else g.name(f"{base}_nobias")
        if conv:
            y = g.op("Conv", ins, y, **self.conv_attrs(kw, shape[2:]))
            bias = None if bias is None else bias.reshape(-1, *([1] * (len(shape) - 2)))
        else:
            y = g.op("MatMul", ins, y) if matmul else g.op("Gemm", ins, y, transB=1)
        return y if bias is None or inline else g.op("Add", [y, g.const(f"{base}_b", bias)], out)

    def resize(self, node: fx.Node, integer: bool) -> str:
        """``Resize``; on the integer codes where that is exact (:mod:`.resize`)."""
        spec, src = resize_spec(self.gm, node, self.facts), node.args[0]
        if integer and src.name in self.grids:
            grid = self.grids[src.name]
            if spec.exact_on_codes():
                return codes_resize_onnx(self.g, self.env[src.name], grid.scale, grid.zero_point, spec, node.name,
                                         node.name)
            log.warning("kernels='int8': resize %s from %s to %s is not a power-of-two ratio; it runs in float "
                        "and may differ from the simulation in the last bit", node.name, spec.in_size, spec.out_size)
        return spec.onnx(self.g, self.float_arg(src), node.name)

    # -- one node ------------------------------------------------------------------------------------
    def translate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            value: Any = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return self.g.const(node.name, value.detach().cpu().float().numpy())
        if not self.facts[node.name].is_tensor:
            return Static(self.facts[node.name].values)
        integer = self.kernels == "int8"
        if is_resize(self.gm, node):
            return self.resize(node, integer)
        m = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, (QuantModule, nn.Conv2d, nn.Linear)):
            if integer and is_integer_layer(m):
                y, op = integer_layer(self, node, m, self.grids.get(node.name))
                self.layer_ops[node.target] = op
                return y
            return self.float_layer(node, m)
        if integer and node.name in self.grids:  # an add of two uint8 tensors, or codes passed through
            src = [a for a in node.args if isinstance(a, fx.Node)]
            if len(src) == 2:
                return qlinear_add(self, node, self.grids[node.name])
            if isinstance(m, nn.MaxPool2d):
                return translate_module(self, node, m, self.env[src[0].name], node.name)
            return self.env[src[0].name]  # a fused ReLU, Identity, Dropout: the same codes
        args = [self.float_arg(a) for a in node.args]
        kwargs = {k: self.float_arg(v) for k, v in node.kwargs.items()}
        if m is not None:
            return translate_module(self, node, m, args[0], node.name)
        return translate_call(self, node, args, kwargs, node.name)


def _qdq(g: Graph, x: str, grid, base: str) -> str:
    """``x`` rounded to ``grid`` (uint8 QuantizeLinear, then DequantizeLinear)."""
    scale = g.const(f"{base}_rq_scale", f32(grid.scale))
    zp = g.const(f"{base}_rq_zp", np.array(grid.zero_point, np.uint8))
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, zp], g.name(f"{base}_rq_q")), scale, zp],
                g.name(f"{base}_rq"))


def _stored_as(op: str, m: QuantModule, opset: int, int4: bool) -> str:
    if op == "MatMulNBits":
        return f"{4 if m.w_bits <= 4 else 8}-bit blocks"
    return weight_storage(m.w_bits, opset, int4) if op in ("Conv", "Gemm") else "int8"


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest opset that onnx defines and the installed onnxruntime (if any) runs a
    QuantizeLinear -> DequantizeLinear graph at (onnx may define opsets before onnxruntime
    implements their quantization ops)."""
    import onnx
    from onnx import TensorProto, helper

    newest = onnx.defs.onnx_opset_version()
    try:
        import onnxruntime as ort
    except ImportError:
        return newest
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y"))
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "probe", [x], [y], inits)
    for opset in range(newest, MIN_OPSET, -1):
        ops = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 (onnxruntime raises one type per reason; any means "not this opset")
            continue
    return MIN_OPSET


def check_opset(opset: Any) -> None:
    """Refuse an opset below ``MIN_OPSET`` or above :func:`max_opset` (an ExportError naming it)."""
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset: ONNX opset must be an integer from {MIN_OPSET} (per-channel DequantizeLinear) "
                          f"to {top} (the newest the installed onnx and onnxruntime both run), got {opset!r}")


def to_onnx(model: nn.Module, opset: int = DEFAULT_OPSET, int4: bool = True,
            input_shape: Sequence[int | str] | None = None, meta: dict | None = None, kernels: str = "qdq",
            calib: torch.Tensor | None = None, plan: IntegerPlan | None = None, target_cpu: str = "any"):
    """The ``onnx.ModelProto`` of ``model`` (checked with ``onnx.checker``).

    ``kernels``: ``"qdq"``, ``"int8"`` (needs ``plan`` or calibration images ``calib``) or
    ``"fp32"`` (models without QuantModules). A QDQ form given a ``plan`` (or ``calib``) also
    rounds where the integer graph requantizes (Q/DQ pairs, int32-rounded biases: the model
    mergeq evaluates, :mod:`.requant`); without one it is the fake-quant model alone. ``target_cpu`` (int8): ``"any"`` stores weights so
    that every x86 kind computes them exactly, ``"vnni"`` int8 everywhere (exact with VNNI, and
    faster), ``"native"`` the choice for this CPU (:func:`~.integer.weight_zero_point`).
    The model's mergeq metadata (as in packed checkpoints, plus ``meta``, the integer plan, the
    target CPU, each integer layer's weight type and which op runs each quantized layer) goes
    into the ``mergeq`` metadata property as JSON.
    """
    import onnx
    from onnx import TensorProto, helper

    if kernels not in KERNELS:
        raise ExportError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    check_opset(opset)
    target_cpu = resolve_target_cpu(target_cpu)
    quantized = bool(quant_modules(model))
    if kernels == "fp32" and (calib is not None or plan is not None):
        raise ExportError("calib and plan set up the integer graph's requantizations; kernels='fp32' has none")
    if kernels == "fp32" and quantized:
        raise ExportError("kernels='fp32' exports an unquantized model; this one has QuantModules "
                          "(use 'qdq' or 'int8')")
    if kernels != "fp32":
        check_exportable(model)
    model = model.eval()
    if kernels == "int8" and plan is None and calib is None and any(is_integer_layer(m) for _, m in quant_modules(model)):
        raise ExportError("kernels='int8' needs calibration images (calib) or an integer plan")
    if plan is None and calib is not None:
        plan = plan_integer(model, calib)
    gm = trace(model)
    shape = list(input_shape) if input_shape is not None else infer_input_shape(gm)
    facts = node_facts(gm, shape)
    g = Graph(opset, int4)
    g.reserve([n.name for n in gm.graph.nodes])
    g.input_name = g.name("input")
    ex = _Exporter(gm, g, facts, kernels, plan, target_cpu)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError("only models with a single tensor input can be exported")
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ex.env[node.name] = g.input_name
        elif node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node) or not facts[res.name].is_tensor:
                raise ExportError("only models returning a single tensor can be exported")
            output = g.op("Identity", [ex.float_arg(res)], g.name("logits"))
            out_facts = facts[res.name]
        else:
            ex.env[node.name] = ex.translate(node)
            if node.name in ex.requant:  # the integer graph's requantization, as Q/DQ (.requant)
                ex.env[node.name] = _qdq(g, ex.env[node.name], ex.requant[node.name], node.name)
    if kernels == "int8":
        floats = [n for n, op in ex.layer_ops.items() if op in ("Conv", "Gemm")]
        if len(floats) == len(ex.layer_ops):
            raise ExportError("kernels='int8': no layer of this model has an integer kernel (weight-only Conv2d "
                              "layers and grouped steps with activation quantization run in float); use 'qdq'")
        if floats:
            log.warning("kernels='int8': %d of %d quantized layers have no integer kernel and run in float "
                        "(weight-only Conv2d, or grouped steps with activation quantization): %s",
                        len(floats), len(ex.layer_ops), ", ".join(floats))
    if g.static_input:  # reshape targets were built for the traced size: fix it in the input
        traced = facts[placeholders[0].name].values[0]
        shape = [shape[0]] + [int(d) for d in traced[1:]]
    inputs = [helper.make_tensor_value_info(g.input_name, TensorProto.FLOAT, shape)]
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(g.domains)]

    def build(out_types: list) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(g.nodes, f"mergeq_{kernels}", inputs, out_types, g.inits),
                                 opset_imports=opsets, producer_name="mergeq",
                                 ir_version=helper.find_min_ir_version_for(opsets[:1]))

    # the output's shape comes from ONNX shape inference on the graph (e.g. [N, num_classes])
    inferred = onnx.shape_inference.infer_shapes(build([]))
    known = {v.name: v for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")}
    traced_out = ["N" if i in out_facts.batch_dims() else int(d) if g.static_input else f"d{i}"
                  for i, d in enumerate(out_facts.values[0])]
    proto = build([known.get(output) or helper.make_tensor_value_info(output, TensorProto.FLOAT, traced_out)])
    info: dict[str, Any] = {"onnx_opset": opset, "kernels": kernels, "layer_ops": ex.layer_ops}
    if quantized:
        info.update(packed_metadata(model, meta))
        info["weight_storage"] = {n: _stored_as(ex.layer_ops[n], m, opset, int4) for n, m in quant_modules(model)}
    else:
        info.update(meta or {})
    if plan is not None:
        info["integer_plan"] = plan.to_json()
    if plan is not None and kernels == "int8":
        info["target_cpu"] = target_cpu
        info["integer_weights"] = ex.weight_types
    helper.set_model_props(proto, {"mergeq": json.dumps(info, default=str)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, int4: bool = True,
                input_shape: Sequence[int | str] | None = None, meta: dict | None = None, kernels: str = "qdq",
                calib: torch.Tensor | None = None, plan: IntegerPlan | None = None, target_cpu: str = "any") -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); arguments as :func:`to_onnx`.

    ``int4=False`` stores 2..4-bit weight codes as INT8 even at opset >= 21 (QDQ form).
    ``input_shape`` defaults to ``[N, C, H, W]`` with C read from the first layer.
    """
    proto = to_onnx(model, opset, int4, input_shape, meta, kernels, calib, plan, target_cpu)
    return atomic_write_bytes(path, proto.SerializeToString())


def ort_session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None):
    """An onnxruntime CPU ``InferenceSession`` with ``threads`` intra-op threads; with
    ``optimized_path``, onnxruntime saves the graph it optimized there (what actually runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
