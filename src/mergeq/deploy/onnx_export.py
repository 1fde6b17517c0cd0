"""ONNX export of a quantized model as a QDQ graph, built directly with ``onnx.helper``.

The model is traced with ``torch.fx`` (QuantModules kept as leaves) and each node is
translated to ONNX for a small, checked op set: Conv2d/Linear (quantized or not), ReLU, Add,
BatchNorm (unfolded), Identity/Dropout, Flatten, global average pooling (also ``x.mean`` over the
spatial dims), MaxPool2d. Anything else raises :class:`ExportError` naming the op.
We do not use ``torch.onnx.export``: its default (dynamo) exporter needs ``onnxscript``, and
the legacy TorchScript exporter (``dynamo=False``) refuses fake-quant ranges other than
(0, 127), (0, 255) and (-128, 127) (a 4-bit (-8, 7) raises), exports a QuantizeLinear on the
float weight rather than an integer initializer, and has no INT4. Writing the graph ourselves
gives exact control of what lands in the file.

Per QuantModule:

* **weights**: the integer codes are an initializer, INT4 when ``w_bits <= 4`` and the opset is
  >= 21 (two codes per byte; onnxruntime's CPU DequantizeLinear takes INT4 since
  microsoft/onnxruntime#20362, i.e. 1.19; checked on 1.32), INT8 otherwise or with
  ``int4=False``. A ``DequantizeLinear`` with the per-output-channel steps (``axis=0``, zero
  point 0) feeds Conv/Gemm; ``code * step`` in float32 is exactly PyTorch's dequantized weight.
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
at every optimization level. onnxruntime then runs Conv/Gemm in float on dequantized inputs
(our layers have no output quantizer, so there is no Q after Conv to fuse into QLinearConv):
the file is a faithful, compact QDQ deployment format, not an integer-kernel speed-up.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..io import atomic_write_bytes
from ..nn.qmodule import QuantModule, quant_modules
from ..quant import qrange, quantize_int
from .pack import ExportError
from .packed import check_exportable, packed_metadata

MIN_OPSET, DEFAULT_OPSET, INT4_OPSET = 13, 21, 21


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


def weight_storage(w_bits: int, opset: int, int4: bool = True) -> str:
    """``'int4'`` or ``'int8'``: how a ``w_bits`` weight is stored at ``opset``."""
    return "int4" if int4 and w_bits <= 4 and opset >= INT4_OPSET else "int8"


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, opset: int, int4: bool) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TP = helper, numpy_helper, TensorProto
        self.opset, self.int4 = opset, int4
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def int_codes(self, base: str, codes: np.ndarray, use_int4: bool) -> str:
        name = self.name(base)
        if not use_int4:
            self.inits.append(self.numpy_helper.from_array(codes.astype(np.int8), name))
            return name
        nib = (codes.astype(np.int8).flatten() & 0xF).astype(np.uint8)
        nib = np.concatenate([nib, np.zeros(len(nib) % 2, np.uint8)])
        raw = (nib[0::2] | (nib[1::2] << 4)).tobytes()  # element 0 in the low nibble
        self.inits.append(self.helper.make_tensor(name, self.TP.INT4, codes.shape, raw, raw=True))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _f32(x: float) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def _act_qdq(g: _Graph, x: str, m: QuantModule, base: str) -> str:
    aq = m.act_quant
    s = float(aq.step.detach().abs().clamp_min(1e-8))  # the step ActQuantizer.forward uses
    signed = bool(aq.signed)
    lo, hi = qrange(aq.bits, signed)
    full = (-128, 127) if signed else (0, 255)
    if (lo, hi) != full:
        x = g.op("Clip", [x, g.const(f"{base}_clip_lo", np.float32(lo) * np.float32(s)),
                          g.const(f"{base}_clip_hi", np.float32(hi) * np.float32(s))])
    scale = g.const(f"{base}_a_scale", _f32(s))
    zp = g.const(f"{base}_a_zp", np.array(0, dtype=np.int8 if signed else np.uint8))
    q = g.op("QuantizeLinear", [x, scale, zp], g.name(f"{base}_a_q"))
    return g.op("DequantizeLinear", [q, scale, zp], g.name(f"{base}_a_dq"))


def _conv_attrs(m: nn.Module, kw: dict, kernel: Sequence[int]) -> dict:
    pad, dil = kw["padding"], tuple(kw["dilation"])
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:  # 'same' (stride 1): torch pads the extra element at the end
            totals = [d * (k - 1) for d, k in zip(dil, kernel)]
            return dict(kernel_shape=list(kernel), strides=list(kw["stride"]), dilations=list(dil),
                        group=kw["groups"], pads=[t // 2 for t in totals] + [t - t // 2 for t in totals])
    return dict(kernel_shape=list(kernel), strides=list(kw["stride"]), dilations=list(dil), group=kw["groups"],
                pads=list(pad) * 2)


def _linear_layer(g: _Graph, x: str, m: nn.Module, base: str, out: str) -> str:
    """Conv or Gemm for a QuantModule (QDQ) or a plain Conv2d/Linear (float)."""
    if isinstance(m, QuantModule):
        if m.act_quant is not None and m.quant_act:
            x = _act_qdq(g, x, m, base)
        w = m.weight.detach().cpu()
        codes = quantize_int(w, m.w_step.cpu(), m.w_bits).to(torch.int8).numpy()
        wq = g.int_codes(f"{base}_w_codes", codes, weight_storage(m.w_bits, g.opset, g.int4) == "int4")
        scale = g.const(f"{base}_w_scale", m.w_step.detach().cpu().float().flatten().numpy())
        wname = g.op("DequantizeLinear", [wq, scale], g.name(f"{base}_w"), axis=0)
        kind, kw = m.kind, getattr(m, "conv_kwargs", None)
    else:
        w = m.weight.detach().cpu()
        wname = g.const(f"{base}_w", w.float().numpy())
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups) if kind == "conv" else None
    bias = None if m.bias is None else m.bias.detach().cpu().float().numpy()
    y = out if bias is None else g.name(f"{base}_nobias")
    if kind == "conv":
        y = g.op("Conv", [x, wname], y, **_conv_attrs(m, kw, w.shape[2:]))
        bias = None if bias is None else bias.reshape(-1, *([1] * (w.dim() - 2)))
    else:
        y = g.op("Gemm", [x, wname], y, transB=1)
    # a separate float Add: onnxruntime re-quantizes a Conv's bias input to int32 (lossy)
    return y if bias is None else g.op("Add", [y, g.const(f"{base}_b", bias)], out)


def _is_global_pool(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and len(size) == 2 and all(s == 1 for s in size))


def _reduce_mean(g: _Graph, x: str, dims: Sequence[int], keepdim: bool, out: str) -> str:
    if g.opset >= 18:
        return g.op("ReduceMean", [x, g.const("axes", np.array(dims, np.int64))], out, keepdims=int(keepdim))
    return g.op("ReduceMean", [x], out, axes=list(dims), keepdims=int(keepdim))


def _translate(g: _Graph, node: fx.Node, model: nn.Module, env: dict[fx.Node, str]) -> str:
    """Emit the ONNX nodes of one fx node; return the name of its output."""
    args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
    kwargs = {k: env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    out, t = node.name, node.target
    if node.op == "call_module":
        m = model.get_submodule(t)
        if isinstance(m, (QuantModule, nn.Conv2d, nn.Linear)):
            return _linear_layer(g, args[0], m, t, out)
        if isinstance(m, nn.ReLU):
            return g.op("Relu", [args[0]], out)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return g.op("Identity", [args[0]], out)
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return g.op("Flatten", [args[0]], out, axis=1)
        if isinstance(m, nn.AdaptiveAvgPool2d) and _is_global_pool(m.output_size):
            return g.op("GlobalAveragePool", [args[0]], out)
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
            return g.op("MaxPool", [args[0]], out, kernel_shape=pair(m.kernel_size), strides=pair(m.stride),
                        pads=pair(m.padding) * 2, dilations=pair(m.dilation), ceil_mode=int(m.ceil_mode))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats:
            c = m.num_features
            gamma = m.weight.detach().float().numpy() if m.affine else np.ones(c, np.float32)
            beta = m.bias.detach().float().numpy() if m.affine else np.zeros(c, np.float32)
            ins = [g.const(f"{t}_{k}", v) for k, v in (("scale", gamma), ("bias", beta),
                   ("mean", m.running_mean.float().numpy()), ("var", m.running_var.float().numpy()))]
            return g.op("BatchNormalization", [args[0], *ins], out, epsilon=float(m.eps))
        what = f"module {t} ({type(m).__name__})"
    elif node.op in ("call_function", "call_method"):
        if t in (F.relu, torch.relu, "relu"):
            return g.op("Relu", [args[0]], out)
        if t in (operator.add, operator.iadd, torch.add, "add") and not kwargs:
            ins = [a if isinstance(a, str) else g.const("addend", _f32(a)) for a in args[:2]]
            return g.op("Add", ins, out)
        if t in (torch.flatten, "flatten"):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            if start == 1 and end == -1:
                return g.op("Flatten", [args[0]], out, axis=1)
        if t is F.adaptive_avg_pool2d and _is_global_pool(args[1] if len(args) > 1 else kwargs.get("output_size")):
            return g.op("GlobalAveragePool", [args[0]], out)
        if t == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            if dims is not None:
                dims = [dims] if isinstance(dims, int) else list(dims)
                return _reduce_mean(g, args[0], dims, bool(kwargs.get("keepdim", False)), out)
        what = f"{node.op} {getattr(t, '__name__', t)} with args {node.args[1:]} {node.kwargs}"
    else:
        what = f"{node.op} {t}"
    raise ExportError(f"cannot export {what} to ONNX; supported: Conv2d, Linear, ReLU, add, BatchNorm, "
                      "Identity, Dropout, MaxPool2d, flatten(x, 1), global average pooling, mean over dims")


def _input_shape(graph: fx.Graph, model: nn.Module) -> list[int | str]:
    """``[N, C, H, W]`` (or ``[N, F]``) from the layer that consumes the input directly."""
    ph = next(n for n in graph.nodes if n.op == "placeholder")
    users = [u for u in ph.users if u.op == "call_module"]
    if len(ph.users) == 1 and users:
        m = model.get_submodule(users[0].target)
        if isinstance(m, QuantModule) and m.kind == "conv":
            return ["N", m.weight.shape[1] * m.conv_kwargs["groups"], "H", "W"]
        if isinstance(m, (QuantModule, nn.Linear)):
            return ["N", m.weight.shape[1]]
    raise ExportError("cannot infer the model's input shape; pass input_shape, e.g. ['N', 3, 32, 32]")


def to_onnx(model: nn.Module, opset: int = DEFAULT_OPSET, int4: bool = True,
            input_shape: Sequence[int | str] | None = None, meta: dict | None = None):
    """The QDQ ``onnx.ModelProto`` of a quantized model (checked with ``onnx.checker``).

    The model's mergeq metadata (as in packed checkpoints, plus ``meta``) goes into the
    ``mergeq`` metadata property as JSON.
    """
    import onnx
    from onnx import TensorProto, helper

    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"ONNX opset must be an integer from {MIN_OPSET} (per-channel DequantizeLinear) "
                          f"to {max_opset}, got {opset!r}")
    check_exportable(model)
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx: {e}") from None
    g = _Graph(opset, int4)
    env: dict[fx.Node, str] = {}
    inputs, outputs = [], []
    for node in graph.nodes:
        if node.op == "placeholder":
            if inputs:
                raise ExportError("only models with a single tensor input can be exported")
            shape = list(input_shape) if input_shape is not None else _input_shape(graph, model)
            env[node] = g.name("input")
            inputs.append(helper.make_tensor_value_info(env[node], TensorProto.FLOAT, shape))
        elif node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise ExportError("only models returning a single tensor can be exported")
            outputs.append(g.op("Identity", [env[res]], g.name("logits")))
        else:
            env[node] = _translate(g, node, model, env)
    opsets = [helper.make_opsetid("", opset)]

    def build(out_types: list) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(g.nodes, "mergeq_qdq", inputs, out_types, g.inits),
                                 opset_imports=opsets, producer_name="mergeq",
                                 ir_version=helper.find_min_ir_version_for(opsets))

    # the output's shape comes from ONNX shape inference on the graph (e.g. [N, num_classes])
    inferred = onnx.shape_inference.infer_shapes(build([]))
    known = {v.name: v for v in inferred.graph.value_info}
    out_types = [known[o] if o in known else helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", f"D{i}"])
                 for i, o in enumerate(outputs)]
    proto = build(out_types)
    info = {**packed_metadata(model, meta), "onnx_opset": opset,
            "weight_storage": {n: weight_storage(m.w_bits, opset, int4) for n, m in quant_modules(model)}}
    helper.set_model_props(proto, {"mergeq": json.dumps(info, default=str)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, int4: bool = True,
                input_shape: Sequence[int | str] | None = None, meta: dict | None = None) -> Path:
    """Write ``model`` (quantized, possibly merged) as a QDQ ONNX file at ``path`` (atomically).

    ``int4=False`` stores 2..4-bit weight codes as INT8 even at opset >= 21.
    ``input_shape`` defaults to ``[N, C, H, W]`` with C read from the first layer.
    """
    proto = to_onnx(model, opset, int4, input_shape, meta)
    return atomic_write_bytes(path, proto.SerializeToString())


def ort_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU ``InferenceSession`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
