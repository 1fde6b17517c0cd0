"""The integer ONNX ops of a quantized model (``to_onnx(kernels="int8")``), following the plan
and arithmetic of :mod:`mergeq.deploy.integer`:

* an integer Conv2d: ``QLinearConv`` (uint8 input, int8 weights, per-channel scales, int32
  bias, uint8 output);
* an integer Linear: ``MatMulIntegerToFloat`` (com.microsoft; float output with bias);
* a residual add of two uint8 tensors: ``QLinearAdd`` (com.microsoft);
* a weight-only Linear: ``MatMulNBits`` (com.microsoft, block-quantized weights, float
  activations): 2..4-bit codes as 4-bit blocks, 5..8-bit codes as 8-bit blocks; per-channel
  steps are repeated over blocks of 32, contiguous groups of a power-of-two size >= 16 are its
  blocks, other groupings (GPTQ ``act_order``) use its ``g_idx`` input (4-bit only). Zero
  points are left out: the default ``2^(bits-1)`` is the offset of signed codes.

Integer kernels need 8-bit weight initializers: an integer layer's file holds one byte per code
whatever ``w_bits`` is (the QDQ export keeps INT4): int8 codes, or uint8 codes with zero point
128 where uint8 x int8 kernels without VNNI could saturate (:func:`~.integer.saturation_free`).
"""
from __future__ import annotations

import numpy as np
from torch import fx

from ..nn.qmodule import QuantModule
from .groups import contiguous_block, weight_groups
from .integer import Grid, int_bias, weight_codes, weight_scales, weight_zero_point
from .onnx_graph import MS_DOMAIN, f32

NBITS_BLOCK = 32  # MatMulNBits block for per-channel steps


def _u8(v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint8)


def input_codes(ex, arg: fx.Node, grid: Grid) -> str:
    """uint8 codes of ``arg`` on ``grid``: a Clip of a uint8 tensor already on that grid's scale,
    else (Clip ->) QuantizeLinear of its float value. Shared by the consumers of one value."""
    key = (arg.name, grid)
    if key in ex.codes_memo:
        return ex.codes_memo[key]
    g, src = ex.g, ex.grids.get(arg.name)
    base = f"{arg.name}_q{grid.hi - grid.lo + 1}"
    if src is not None and (src.scale, src.zero_point) == (grid.scale, grid.zero_point):
        q = ex.env[arg.name]
        if (grid.lo, grid.hi) != (0, 255):
            q = g.op("Clip", [q, g.const(f"{base}_lo", _u8(grid.lo)), g.const(f"{base}_hi", _u8(grid.hi))],
                     g.name(base))
    else:
        x = ex.float_arg(arg)
        bounds = grid.clip_bounds()
        if bounds is not None:
            x = g.op("Clip", [x, g.const(f"{base}_clip_lo", bounds[0]), g.const(f"{base}_clip_hi", bounds[1])])
        q = g.op("QuantizeLinear", [x, g.const(f"{base}_scale", f32(grid.scale)),
                                    g.const(f"{base}_zp", _u8(grid.zero_point))], g.name(base))
    ex.codes_memo[key] = q
    return q


def dequantize(ex, name: str, grid: Grid, base: str) -> str:
    g = ex.g
    return g.op("DequantizeLinear", [name, g.const(f"{base}_dq_scale", f32(grid.scale)),
                                     g.const(f"{base}_dq_zp", _u8(grid.zero_point))], g.name(f"{base}_dq"))


def integer_layer(ex, node: fx.Node, m: QuantModule, out_grid: Grid | None) -> tuple[str, str]:
    """Emit an integer layer (``out_grid``: the plan's grid of a Conv2d's output; a Linear writes
    float); return its output name and the op that multiplies. Weights are int8 codes, or uint8
    codes ``w + 128`` where int8 could saturate without VNNI (:func:`~.integer.weight_zero_point`)."""
    g, base, out = ex.g, node.target, node.name
    grid = Grid.of(m.act_quant)
    xq = input_codes(ex, node.args[0], grid)
    zx = g.const(f"{base}_x_zp", _u8(grid.zero_point))
    zw = weight_zero_point(m, grid, ex.target_cpu)
    codes = (weight_codes(m).numpy() + zw).astype(np.uint8 if zw else np.int8)
    ex.weight_types[base] = "uint8" if zw else "int8"
    if m.kind == "linear":
        ins = [xq, g.const(f"{base}_w_codes", codes.T), g.const(f"{base}_x_scale", f32(grid.scale)),
               g.const(f"{base}_w_scale", weight_scales(m)), zx,
               g.const(f"{base}_w_zp", np.full(codes.shape[0], zw, codes.dtype))]
        if m.bias is not None:
            ins.append(g.const(f"{base}_b", m.bias.detach().cpu().float().numpy()))
        return g.op("MatMulIntegerToFloat", ins, out, domain=MS_DOMAIN), "MatMulIntegerToFloat"
    ins = [xq, g.const(f"{base}_x_scale", f32(grid.scale)), zx, g.const(f"{base}_w_codes", codes),
           g.const(f"{base}_w_scale", weight_scales(m)), g.const(f"{base}_w_zp", np.array(zw, codes.dtype)),
           g.const(f"{base}_y_scale", f32(out_grid.scale)), g.const(f"{base}_y_zp", _u8(out_grid.zero_point))]
    b = int_bias(m, grid)
    if b is not None:
        ins.append(g.const(f"{base}_b_q", b))
    return g.op("QLinearConv", ins, out, **ex.conv_attrs(m.conv_kwargs, codes.shape[2:])), "QLinearConv"


def qlinear_add(ex, node: fx.Node, grid: Grid) -> str:
    g = ex.g
    ins = []
    for a in node.args:
        ga = ex.grids[a.name]
        ins += [ex.env[a.name], g.const(f"{node.name}_{a.name}_scale", f32(ga.scale)),
                g.const(f"{node.name}_{a.name}_zp", _u8(ga.zero_point))]
    ins += [g.const(f"{node.name}_scale", f32(grid.scale)), g.const(f"{node.name}_zp", _u8(grid.zero_point))]
    return g.op("QLinearAdd", ins, node.name, domain=MS_DOMAIN)


def _nbits_layout(m: QuantModule, bits: int) -> tuple[int, np.ndarray, np.ndarray | None] | None:
    """``(block_size, scales [N, n_blocks], g_idx)`` for MatMulNBits, or ``None`` if it does not apply."""
    steps, g_idx = weight_groups(m)
    n, k = m.weight.shape
    if g_idx is None:
        block = NBITS_BLOCK
        return block, np.repeat(steps.numpy(), -(-k // block), axis=1), None
    block = contiguous_block(g_idx)
    if block is not None and block >= 16 and block & (block - 1) == 0:
        return block, steps.numpy(), None
    if bits != 4 or steps.shape[1] > -(-k // 16):
        return None
    scales = np.ones((n, -(-k // 16)), np.float32)
    scales[:, : steps.shape[1]] = steps.numpy()
    return 16, scales, g_idx.numpy().astype(np.int32)


def matmul_nbits(ex, x: str, m: QuantModule, base: str, out: str) -> str | None:
    """A weight-only Linear as MatMulNBits (float in, float out); ``None`` where it does not apply."""
    bits = 4 if m.w_bits <= 4 else 8
    layout = _nbits_layout(m, bits)
    if layout is None:
        return None
    block, scales, g_idx = layout
    g = ex.g
    n, k = m.weight.shape
    blocks = scales.shape[1]
    u = np.full((n, blocks * block), 1 << (bits - 1), np.uint8)  # padding decodes to 0
    u[:, :k] = (weight_codes(m).numpy() + (1 << (bits - 1))).astype(np.uint8)
    stream = np.unpackbits(u[:, :, None], axis=2, count=bits, bitorder="little").reshape(n, -1)
    packed = np.packbits(stream, axis=1, bitorder="little").reshape(n, blocks, block * bits // 8)
    ins = [x, g.const(f"{base}_w_blocks", packed), g.const(f"{base}_w_scale", scales.reshape(-1).astype(np.float32))]
    if g_idx is not None:
        ins += ["", g.const(f"{base}_g_idx", g_idx)]
    y = g.op("MatMulNBits", ins, out if m.bias is None else None, domain=MS_DOMAIN, K=k, N=n, bits=bits,
             block_size=block)
    if m.bias is not None:
        y = g.op("Add", [y, g.const(f"{base}_b", m.bias.detach().cpu().float().numpy())], out)
    return y
