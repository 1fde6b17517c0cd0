"""Float ONNX ops for the traced nodes that are not quantized layers: activations, pooling,
normalisation, residual adds, attention and the reshapes around it.

Each translator gets the exporter context (``ex.g`` the graph, ``ex.facts`` the traced shapes)
and the node's arguments with tensors replaced by float ONNX names and shape computations by
:class:`Static` values, and returns the name of the node's output. Reshape, view, flatten and
expand targets come from the traced shapes (``Facts.reshape_target``): ``-1`` (or the runtime
batch size) for the batch dimension, constants elsewhere, so graphs that reshape are exported
for the traced image size. Anything else raises :class:`ExportError` naming the op.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .onnx_graph import f32
from .pack import ExportError

SUPPORTED = ("Conv2d, Linear, ReLU, GELU, add/sub/mul/div, BatchNorm, LayerNorm, softmax, matmul, "
             "scaled_dot_product_attention, Identity, Dropout, MaxPool2d, interpolate / Upsample, flatten, view/reshape, permute, "
             "transpose, expand, cat, indexing with ints and slices, global average pooling, mean over dims")


@dataclass(frozen=True)
class Static:
    """A non-tensor value of the traced model (e.g. ``x.shape[0]``) at the two example batches."""

    values: tuple[Any, Any]

    def value(self, what: str) -> Any:
        a, b = self.values
        if a != b:
            raise ExportError(f"{what} depends on the batch size ({a} vs {b}); only shapes can")
        return a


def _const_operand(ex, a: Any, what: str) -> str:
    if isinstance(a, str):
        return a
    if isinstance(a, Static):
        a = a.value(what)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return ex.g.const("scalar", f32(a))
    raise ExportError(f"cannot export {what} with operand {a!r}")


def _rank(ex, node: fx.Node, i: int = 0) -> int:
    return len(ex.facts[node.all_input_nodes[i].name].values[0])


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _reshape(ex, x: str, node: fx.Node, out: str) -> str:
    ex.g.static_input = True
    target = ex.facts[node.name].reshape_target(f"reshape {node.name}")
    return ex.g.op("Reshape", [x, ex.g.const(f"{out}_shape", np.array(target, np.int64))], out)


def _flatten(ex, x: str, node: fx.Node, start: int, end: int, out: str) -> str:
    rank = _rank(ex, node)
    start, end = _dim(start, rank), _dim(end, rank)
    if start == 1 and end == rank - 1:
        return ex.g.op("Flatten", [x], out, axis=1)
    return _reshape(ex, x, node, out)


def _reduce_mean(ex, x: str, dims: list[int], keepdim: bool, out: str) -> str:
    g = ex.g
    if g.opset >= 18:
        return g.op("ReduceMean", [x, g.const("axes", np.array(dims, np.int64))], out, keepdims=int(keepdim))
    return g.op("ReduceMean", [x], out, axes=list(dims), keepdims=int(keepdim))


def _is_global_pool(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and len(size) == 2 and all(s == 1 for s in size))


def _gelu(ex, x: str, approximate: str, out: str) -> str:
    g = ex.g
    if g.opset >= 20:
        return g.op("Gelu", [x], out, approximate=approximate)
    if approximate != "none":
        raise ExportError(f"GELU with approximate={approximate!r} needs ONNX opset >= 20")
    erf = g.op("Erf", [g.op("Mul", [x, g.const("inv_sqrt2", f32(1 / math.sqrt(2)))])])
    half = g.op("Mul", [x, g.const("half", f32(0.5))])
    return g.op("Mul", [half, g.op("Add", [erf, g.const("one_f", f32(1.0))])], out)


def _layer_norm(ex, x: str, m: nn.LayerNorm, base: str, out: str) -> str:
    g = ex.g
    if g.opset < 17:
        raise ExportError(f"LayerNorm {base} needs ONNX opset >= 17 (LayerNormalization)")
    shape = tuple(m.normalized_shape)
    w = m.weight.detach().cpu().float().numpy() if m.weight is not None else np.ones(shape, np.float32)
    b = m.bias.detach().cpu().float().numpy() if m.bias is not None else np.zeros(shape, np.float32)
    return g.op("LayerNormalization", [x, g.const(f"{base}_scale", w), g.const(f"{base}_bias", b)], out,
                axis=-len(shape), epsilon=float(m.eps))


def _softmax(ex, x: str, dim: int | None, out: str) -> str:
    if dim is None:
        raise ExportError("softmax needs an explicit dim")
    return ex.g.op("Softmax", [x], out, axis=dim)


def _sdpa(ex, node: fx.Node, args: list, kwargs: dict, out: str) -> str:
    """softmax(q kᵀ · scale) v, the math of ``F.scaled_dot_product_attention`` without mask or dropout."""
    q, k, v = args[:3]
    extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:]), **kwargs)
    if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False) \
            or any(key not in ("attn_mask", "dropout_p", "is_causal", "scale") for key in extra):
        raise ExportError(f"scaled_dot_product_attention {node.name}: only the unmasked, dropout-free form "
                          f"exports, got {extra}")
    g = ex.g
    qshape = ex.facts[node.all_input_nodes[0].name].values[0]
    scale = extra.get("scale") or 1.0 / math.sqrt(qshape[-1])
    rank = len(qshape)
    kt = g.op("Transpose", [k], perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    scores = g.op("Mul", [g.op("MatMul", [q, kt]), g.const("attn_scale", f32(scale))])
    return g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v], out)


def _getitem(ex, x: str, node: fx.Node, index: Any, out: str) -> str:
    g = ex.g
    rank = _rank(ex, node)
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > rank or any(i is None or i is Ellipsis for i in index):
        raise ExportError(f"cannot export indexing {node.name} with {index!r}: ints and slices only")
    slices, gathers = [], []
    for axis, i in enumerate(index):
        if isinstance(i, Static):
            i = i.value(f"index of {node.name}")
        if isinstance(i, int):
            gathers.append((axis, i))
        elif isinstance(i, slice) and i.step in (None, 1):
            if (i.start, i.stop) != (None, None):
                slices.append((axis, i.start or 0, i.stop if i.stop is not None else np.iinfo(np.int64).max))
        else:
            raise ExportError(f"cannot export indexing {node.name} with {i!r}: ints and slices of step 1 only")
    y = x
    if slices:
        starts, ends, axes = (np.array(v, np.int64) for v in zip(*[(s, e, a) for a, s, e in slices]))
        y = g.op("Slice", [y, g.const("starts", starts), g.const("ends", ends), g.const("axes", axes)])
    for k, (axis, i) in enumerate(sorted(gathers, reverse=True)):
        y = g.op("Gather", [y, g.const("index", np.array(i, np.int64))], out if k == len(gathers) - 1 else None,
                 axis=axis)
    return y if gathers else g.op("Identity", [y], out)


def _expand(ex, x: str, node: fx.Node, out: str) -> str:
    g = ex.g
    g.static_input = True
    facts = ex.facts[node.name]
    dims = facts.batch_dims()
    first, second = facts.values
    if any((first[d], second[d]) != (2, 3) for d in dims):
        raise ExportError(f"expand {node.name}: a dimension other than the batch depends on the batch size")
    parts = [g.batch() if i in dims else g.const("dim", np.array([s], np.int64)) for i, s in enumerate(first)]
    return g.op("Expand", [x, g.op("Concat", parts, axis=0)], out)


def _dims_arg(args: list, start: int) -> list[int]:
    rest = args[start:]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)


_BINARY = {operator.add: "Add", operator.iadd: "Add", torch.add: "Add", "add": "Add",
           operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub",
           operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul", "mul": "Mul",
           operator.truediv: "Div", torch.div: "Div", "div": "Div",
           operator.matmul: "MatMul", torch.matmul: "MatMul", "matmul": "MatMul"}


def translate_module(ex, node: fx.Node, m: nn.Module, x: str, out: str) -> str:
    """The float ONNX ops of a (non-layer) ``call_module`` node with input ``x``."""
    g, t = ex.g, node.target
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x], out)
    if isinstance(m, nn.GELU):
        return _gelu(ex, x, m.approximate, out)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return g.op("Identity", [x], out)
    if isinstance(m, nn.Flatten):
        return _flatten(ex, x, node, m.start_dim, m.end_dim, out)
    if isinstance(m, nn.AdaptiveAvgPool2d) and _is_global_pool(m.output_size):
        return g.op("GlobalAveragePool", [x], out)
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
        return g.op("MaxPool", [x], out, kernel_shape=pair(m.kernel_size), strides=pair(m.stride),
                    pads=pair(m.padding) * 2, dilations=pair(m.dilation), ceil_mode=int(m.ceil_mode))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats:
        c = m.num_features
        gamma = m.weight.detach().float().numpy() if m.affine else np.ones(c, np.float32)
        beta = m.bias.detach().float().numpy() if m.affine else np.zeros(c, np.float32)
        ins = [g.const(f"{t}_{k}", v) for k, v in (("scale", gamma), ("bias", beta),
               ("mean", m.running_mean.float().numpy()), ("var", m.running_var.float().numpy()))]
        return g.op("BatchNormalization", [x, *ins], out, epsilon=float(m.eps))
    if isinstance(m, nn.LayerNorm):
        return _layer_norm(ex, x, m, t, out)
    if isinstance(m, nn.Softmax):
        return _softmax(ex, x, m.dim, out)
    raise ExportError(f"cannot export module {t} ({type(m).__name__}) to ONNX; supported: {SUPPORTED}")


def translate_call(ex, node: fx.Node, args: list, kwargs: dict, out: str) -> str:
    """The float ONNX ops of a ``call_function`` / ``call_method`` node producing a tensor."""
    g, t = ex.g, node.target
    x = args[0] if args else None
    op = _BINARY.get(t)
    if op is not None and len(args) == 2 and not kwargs:
        return g.op(op, [_const_operand(ex, a, f"{op} {node.name}") for a in args], out)
    handlers: dict[Any, Callable[[], str]] = {
        F.relu: lambda: g.op("Relu", [x], out),
        F.gelu: lambda: _gelu(ex, x, kwargs.get("approximate", "none"), out),
        F.scaled_dot_product_attention: lambda: _sdpa(ex, node, args, kwargs, out),
        torch.cat: lambda: g.op("Concat", list(x), out,
                                axis=_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), _rank(ex, node))),
        "contiguous": lambda: g.op("Identity", [x], out),
        "view": lambda: _reshape(ex, x, node, out),
        "reshape": lambda: _reshape(ex, x, node, out),
        torch.reshape: lambda: _reshape(ex, x, node, out),
        "expand": lambda: _expand(ex, x, node, out),
        "permute": lambda: g.op("Transpose", [x], out, perm=[_dim(d, _rank(ex, node)) for d in _dims_arg(args, 1)]),
        operator.getitem: lambda: _getitem(ex, x, node, args[1], out),
    }
    for relu in (torch.relu, "relu"):
        handlers[relu] = handlers[F.relu]
    for softmax in (F.softmax, torch.softmax, "softmax"):
        handlers[softmax] = lambda: _softmax(ex, x, args[1] if len(args) > 1 else kwargs.get("dim"), out)
    if t in ("transpose", torch.transpose):
        rank = _rank(ex, node)
        perm = list(range(rank))
        a, b = (_dim(d, rank) for d in args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
        return g.op("Transpose", [x], out, perm=perm)
    if t in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return _flatten(ex, x, node, start, end, out)
    if t is F.adaptive_avg_pool2d and _is_global_pool(args[1] if len(args) > 1 else kwargs.get("output_size")):
        return g.op("GlobalAveragePool", [x], out)
    if t in ("mean", torch.mean) and (len(args) > 1 or "dim" in kwargs):
        dims = args[1] if len(args) > 1 else kwargs["dim"]
        dims = [dims] if isinstance(dims, int) else list(dims)
        return _reduce_mean(ex, x, dims, bool(kwargs.get("keepdim", False)), out)
    if t in handlers:
        return handlers[t]()
    raise ExportError(f"cannot export {node.op} {getattr(t, '__name__', t)} with args {node.args[1:]} "
                      f"{node.kwargs} to ONNX; supported: {SUPPORTED}")
