"""Resizing (``F.interpolate``, ``nn.Upsample``) in the exported graph and in the integer simulation.

ONNX ``Resize`` (opset >= 13) computes what PyTorch computes for ``bilinear`` with
``align_corners=False`` (``coordinate_transformation_mode="half_pixel"``), ``bilinear`` with
``align_corners=True`` (``"align_corners"``) and ``nearest`` (``"asymmetric"``, ``nearest_mode
"floor"``): the output size is the traced one (the ``sizes`` input; the file is then built for
the traced input size, as for reshapes; pass ``input_shape`` for another). In float the two
libraries compute the weights and order the products differently, so bilinear outputs may differ
in the last bits (measured, onnxruntime 1.32: at most 1.7e-6 of the largest value; ``nearest``
equal).

Exact integer path. Where the resized tensor is uint8 in the integer plan (an integer conv's
output) and every spatial ratio ``out / in`` is a power of two (2^-7 .. 2^7; half-pixel bilinear
or nearest), the interpolation weights are dyadic fractions of a few bits, so interpolating the
integer codes ``c - z`` is exact in float32 in any order of operations. The integer graph does
``DequantizeLinear(c, 1, z) -> Resize -> Mul(s)`` and :class:`~.integer.IntegerSimulation`
``F.interpolate(c - z) * s``: one rounding each, the same one, so onnxruntime and the
simulation agree bit for bit (the fake-quant model interpolates ``(c - z) · s``: last-bit
differences, which :class:`~.check.ExportCheck` measures as its agreement with the evaluated model).
Other ratios run the float ``Resize`` on dequantized values (close, not bit-exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .onnx_graph import f32
from .pack import ExportError

MODES = ("bilinear", "nearest")
MAX_EXACT_LOG2 = 7  # codes <= 255 times weights of 2 x (k + 1) bits stay within float32's 24 bits


@dataclass(frozen=True)
class ResizeSpec:
    """One traced resize: its mode, ``align_corners`` and the input and output spatial sizes."""

    mode: str
    align_corners: bool
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]

    def exact_on_codes(self) -> bool:
        """Whether interpolating integer codes is exact in float32 (module docstring)."""
        if self.align_corners and self.mode == "bilinear":
            return False
        for i, o in zip(self.in_size, self.out_size):
            k = math.log2(o / i)
            if k != round(k) or abs(k) > MAX_EXACT_LOG2:
                return False
        return True

    def interpolate(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.out_size, mode=self.mode,
                             align_corners=self.align_corners if self.mode == "bilinear" else None)

    def onnx(self, g, x: str, out: str | None = None) -> str:
        """``Resize`` of ``x`` to the traced size (batch and channels taken from ``x``)."""
        g.static_input = True
        lead = g.op("Slice", [g.op("Shape", [x]), g.const("zero", np.array([0], np.int64)),
                              g.const("two", np.array([2], np.int64))])
        sizes = g.op("Concat", [lead, g.const("resize_hw", np.array(self.out_size, np.int64))], axis=0)
        if self.mode == "nearest":
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        else:
            attrs = dict(mode="linear",
                         coordinate_transformation_mode="align_corners" if self.align_corners else "half_pixel")
        return g.op("Resize", [x, "", "", sizes], out, **attrs)


def is_resize(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target is F.interpolate
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Upsample)


def resize_spec(gm: fx.GraphModule, n: fx.Node, facts: dict) -> ResizeSpec:
    """The :class:`ResizeSpec` of a resize node, or an :class:`ExportError` naming what is unsupported."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        mode, align, antialias = m.mode, bool(m.align_corners), False
    else:
        names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
        kw = dict(zip(names, n.args), **n.kwargs)
        mode, align, antialias = kw.get("mode", "nearest"), bool(kw.get("align_corners")), kw.get("antialias")
    x = n.args[0]
    shape_in, shape_out = facts[x.name].values[0], facts[n.name].values[0]
    if mode not in MODES or antialias or len(shape_in) != 4:
        raise ExportError(f"cannot export resize {n.name} (mode {mode!r}, antialias {antialias!r}, a "
                          f"{len(shape_in)}-d input); supported: {MODES} on 4-d inputs, without antialias")
    return ResizeSpec(mode, align, tuple(int(s) for s in shape_in[2:]), tuple(int(s) for s in shape_out[2:]))


def codes_resize_onnx(g, codes: str, scale: float, zero_point: int, spec: ResizeSpec, base: str, out: str) -> str:
    """The exact integer path: ``DequantizeLinear(c, 1, z) -> Resize -> Mul(s)``."""
    centred = g.op("DequantizeLinear", [codes, g.const(f"{base}_one", f32(1.0)),
                                        g.const(f"{base}_zp", np.array(zero_point, np.uint8))])
    return g.op("Mul", [spec.onnx(g, centred), g.const(f"{base}_scale", f32(scale))], out)
