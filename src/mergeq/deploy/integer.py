"""Integer inference on onnxruntime's CPU kernels: where each tensor lives on an 8-bit grid (the
plan), and the PyTorch model that computes exactly what those kernels compute.

Where the values live. An *integer layer* is a QuantModule with an input quantizer and one
weight step per output channel. It multiplies codes: its input is a uint8 tensor on its
activation grid (zero point 128 for a signed grid, 0 for an unsigned one; a ``b < 8``-bit grid
is that tensor clipped to ``[lo, hi]``), its weights are int8 codes, its accumulator int32.
Its output is

* for a Conv2d, requantized to uint8 (QLinearConv): on the 8-bit version of the consuming
  layer's own grid when that layer is its only consumer, or when it has an 8-bit input grid
  (one rounding for that layer, exactly the fake-quant model's; its step was calibrated on
  this very tensor, so other consumers such as a residual add get an 8-bit grid fitted to it),
  otherwise on a per-tensor 8-bit grid calibrated on the calibration images like an activation
  step (MSE over clipping ratios, ``ActQuantizer.init_from``). The extra roundings (the 8-bit
  grid seen by the residual path, a second rounding where a layer's b-bit grid differs from
  the tensor's) are what the fake-quant model does not have, and :class:`IntegerSimulation`
  has them too. A residual add of two uint8 tensors that an integer
  op consumes is QLinearAdd (requantized likewise); other ops take the dequantized value. A
  resize (``F.interpolate``, ``nn.Upsample``) of a uint8 tensor by power-of-two ratios
  interpolates its codes, which is exact (:mod:`.resize`); a concatenation joins dequantized
  values, and the consuming layer's one input quantizer puts them on one grid (DAFormer's head).
  (ConvInteger would give a float output without requantization, but onnxruntime 1.32 runs it
  several times slower than QLinearConv.)
* for a Linear, float (MatMulIntegerToFloat: ``acc · s_x s_w`` plus the float bias): what
  follows it in a transformer (GELU, attention, residual adds, LayerNorm) is float anyway.

A ReLU that is its producer's only consumer is fused: the output grid is unsigned, so
saturating at code 0 is the ReLU. Weight-only layers and layers with grouped steps have no
integer kernel here (weight-only Linear layers use MatMulNBits, :mod:`.onnx_integer`).

Arithmetic of onnxruntime 1.32's MLAS kernels on x86 (``fl``: float32 rounding, ``rne``: round
half to even, ``sat``: clamp to [0, 255]), reproduced by :class:`IntegerSimulation`:

* QuantizeLinear: ``q = sat(rne(x / s) + z)``, a Clip before it for b < 8 bits;
* QLinearConv: ``q = sat(rne(fl(acc + b_q) · m) + z_y)``, ``m = fl(fl(s_x s_w) / s_y)``,
  ``b_q = rne(b / (s_x s_w))`` in int32;
* MatMulIntegerToFloat: ``y = fl(acc) · fl(s_x s_w) + b``;
* QLinearAdd (AVX2 kernel): ``q = sat(rne(fma(a, r_a, fma(b, r_b, z_c − (r_a z_a + r_b z_b)))))``
  with ``r = fl(s / s_c)``.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..data_utils import DataLike, as_tensor
from ..nn.qmodule import QuantModule
from ..quant import ActQuantizer, qrange, quantize_int
from .groups import is_grouped
from .pack import ExportError
from .requant import modelable_adds
from .resize import is_resize, resize_spec
from .trace import Facts, node_facts, trace

log = logging.getLogger(__name__)
_ADDS = (operator.add, operator.iadd, torch.add, "add")
_RELUS = (F.relu, torch.relu, "relu")
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d)  # act on uint8 codes as on values
INT16_MAX = 32767
TARGET_CPUS = ("any", "vnni", "native")
DEPLOY_CALIB_SIZE = 512  # images an integer plan is calibrated on by default (``export``, evaluation)  # what the int8 export's weight types must be exact on


@dataclass(frozen=True)
class Grid:
    """A uint8 tensor's grid: value = (code − zero_point) · scale, codes kept within [lo, hi]."""

    scale: float  # a float32 value
    zero_point: int  # 128 (signed grid) or 0 (unsigned)
    lo: int = 0
    hi: int = 255

    @classmethod
    def of(cls, aq: ActQuantizer) -> "Grid":
        """The input grid of a layer with activation quantizer ``aq`` (its b-bit range as uint8 codes)."""
        signed = bool(aq.signed)
        zp = 128 if signed else 0
        lo, hi = qrange(aq.bits, signed)
        return cls(float(np.float32(aq.step.detach().abs().clamp_min(1e-8).item())), zp, lo + zp, hi + zp)

    def full(self) -> "Grid":
        return replace(self, lo=0, hi=255)

    def clip_bounds(self) -> tuple[np.float32, np.float32] | None:
        """Float bounds of the Clip restricting values to [lo, hi] (``None`` for the full 8 bits)."""
        if (self.lo, self.hi) == (0, 255):
            return None
        s = np.float32(self.scale)
        return np.float32(self.lo - self.zero_point) * s, np.float32(self.hi - self.zero_point) * s

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (float tensor of integers) of float ``x``: Clip, then QuantizeLinear."""
        bounds = self.clip_bounds()
        if bounds is not None:
            x = x.clamp(float(bounds[0]), float(bounds[1]))
        return (torch.round(x.float() / self.scale) + self.zero_point).clamp(0, 255)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point).float() * self.scale

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """Codes of values ``v`` already on this grid (exact inverse of :meth:`dequantize`)."""
        return torch.round(v / self.scale) + self.zero_point


@dataclass
class IntegerPlan:
    """The grid of every tensor the integer graph keeps in uint8, by ``torch.fx`` node name, and
    the input shape the model was traced with (``"N"`` for the batch)."""

    grids: dict[str, Grid]
    input_shape: list[int | str]

    def to_json(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape,
                "grids": {k: [g.scale, g.zero_point, g.lo, g.hi] for k, g in self.grids.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IntegerPlan":
        return cls({k: Grid(float(v[0]), int(v[1]), int(v[2]), int(v[3])) for k, v in d["grids"].items()},
                   list(d["input_shape"]))


def is_integer_layer(m: nn.Module) -> bool:
    """A QuantModule that runs on an integer kernel: input quantized, one weight step per channel."""
    return (isinstance(m, QuantModule) and m.act_quant is not None and m.quant_act
            and bool(m.act_quant.initialized) and not is_grouped(m))


def weight_codes(m: QuantModule) -> torch.Tensor:
    """The layer's weight codes (int64) on its grid."""
    return quantize_int(m.weight.detach().cpu(), m.w_step.detach().cpu(), m.w_bits).to(torch.int64)


def saturation_free(codes: torch.Tensor, grid: Grid) -> bool:
    """Whether uint8 x int8 kernels without VNNI compute this layer exactly.

    On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) onnxruntime's MLAS multiplies uint8
    activation codes by int8 weight codes with ``vpmaddubsw``, which adds two adjacent products
    into an int16 with saturation. Activation codes lie in ``[0, grid.hi]``, so every pair sum
    is exact when ``2 · grid.hi · max|w| <= 32767``: 7-bit weights against 8-bit inputs
    (onnxruntime's ``reduce_range``), any weights against a 4-bit unsigned input. 8-bit weights
    against 8-bit inputs are not.
    """
    return 2 * grid.hi * int(codes.abs().max()) <= INT16_MAX


def resolve_target_cpu(target_cpu: str) -> str:
    """``"any"`` or ``"vnni"``: ``"native"`` is ``"vnni"`` on a CPU with VNNI, else ``"any"``."""
    from ..sysinfo import has_vnni

    if target_cpu not in TARGET_CPUS:
        raise ExportError(f"target_cpu must be one of {TARGET_CPUS}, got {target_cpu!r}")
    return ("vnni" if has_vnni() else "any") if target_cpu == "native" else target_cpu


def weight_zero_point(m: QuantModule, grid: Grid, target_cpu: str = "any") -> int:
    """The exported weights' zero point: 0 (int8 codes, uint8 x int8 kernels) or 128 (uint8 codes
    ``w + 128``, uint8 x uint8 kernels, which widen to int16 before multiplying: exact on every
    x86 kind, but about half as fast as VNNI's uint8 x int8). ``target_cpu="any"`` keeps int8
    where :func:`saturation_free`; ``"vnni"`` keeps int8 everywhere (exact where the CPU has
    VNNI, or on ARM); ``"native"``: ``"vnni"`` if this CPU has VNNI."""
    return 0 if resolve_target_cpu(target_cpu) == "vnni" or saturation_free(weight_codes(m), grid) else 128


def weight_scales(m: QuantModule) -> np.ndarray:
    return m.w_step.detach().cpu().float().flatten().numpy()


def accumulator_scale(m: QuantModule, grid: Grid) -> np.ndarray:
    """``fl(s_x s_w)`` per output channel: one accumulator unit as a float."""
    return np.float32(grid.scale) * weight_scales(m)


def requant_multiplier(m: QuantModule, grid: Grid, out: Grid) -> np.ndarray:
    """``fl(fl(s_x s_w) / s_y)``: QLinearConv's per-channel output multiplier."""
    return accumulator_scale(m, grid) / np.float32(out.scale)


def int_bias(m: QuantModule, grid: Grid) -> np.ndarray | None:
    """The float bias as int32 accumulator units, ``rne(b / (s_x s_w))``."""
    if m.bias is None:
        return None
    b = m.bias.detach().cpu().double().numpy() / accumulator_scale(m, grid).astype(np.float64)
    info = np.iinfo(np.int32)
    return np.clip(np.rint(b), info.min, info.max).astype(np.int32)


def qadd_codes(a: torch.Tensor, ga: Grid, b: torch.Tensor, gb: Grid, gc: Grid) -> torch.Tensor:
    """QLinearAdd's output codes for input codes ``a``, ``b`` (MLAS AVX2 arithmetic)."""
    sc = np.float32(gc.scale)
    ra, rb = np.float32(ga.scale) / sc, np.float32(gb.scale) / sc
    fixed = np.float32(gc.zero_point) - (ra * np.float32(ga.zero_point) + rb * np.float32(gb.zero_point))
    t = (b.double() * float(rb) + float(fixed)).float()  # fma, rounded once
    return torch.round((a.double() * float(ra) + t.double()).float()).clamp(0, 255)


# -- the plan ---------------------------------------------------------------------------------------
class _Roles:
    """What each traced node is, for deciding which tensors stay integer."""

    def __init__(self, gm: fx.GraphModule, facts: dict[str, Facts]) -> None:
        self.gm, self.facts = gm, facts
        self.layers = {n: gm.get_submodule(n.target) for n in gm.graph.nodes
                       if n.op == "call_module" and is_integer_layer(gm.get_submodule(n.target))}
        self.fused = {r for r in map(self.fused_relu, gm.graph.nodes) if r is not None}

    def kind(self, n: fx.Node) -> str | None:
        if n in self.layers:
            return "layer"
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target)
            return "relu" if isinstance(m, nn.ReLU) else "pass" if isinstance(m, _PASS_MODULES) else None
        if n.op in ("call_function", "call_method"):
            if n.target in _RELUS:
                return "relu"
            if (n.target in _ADDS and len(n.args) == 2 and not n.kwargs
                    and all(isinstance(a, fx.Node) and self.facts[a.name].is_tensor for a in n.args)
                    and self.facts[n.args[0].name].values == self.facts[n.args[1].name].values):
                return "add"
        return None

    def is_producer(self, n: fx.Node) -> bool:
        """Conv integer layers (QLinearConv) and adds can write uint8; Linear layers write float."""
        k = self.kind(n)
        return k == "add" or (k == "layer" and self.layers[n].kind == "conv")

    def fused_relu(self, n: fx.Node) -> fx.Node | None:
        """The ReLU ending a chain of single users from producer ``n`` through pass-through modules
        (e.g. a folded BatchNorm's Identity): saturating ``n``'s unsigned codes at 0 is that ReLU."""
        if not self.is_producer(n):
            return None
        while len(n.users) == 1:
            (n,) = n.users
            if self.kind(n) == "relu":
                return n
            if self.kind(n) != "pass":
                break
        return None

    def source(self, a: fx.Node) -> fx.Node:
        """The producer whose uint8 value ``a`` carries (through fused ReLUs and pass-through modules)."""
        while self.kind(a) == "pass" or a in self.fused:
            a = a.args[0]
        return a

    def consumers(self, n: fx.Node) -> list[fx.Node]:
        """The users of ``n``'s value, looking through fused ReLUs and pass-through modules."""
        out: list[fx.Node] = []
        for u in n.users:
            out += self.consumers(u) if self.kind(u) == "pass" or u in self.fused else [u]
        return out


def _integer_producers(roles: _Roles) -> list[fx.Node]:
    """Producers whose output is uint8: every integer conv, and the adds of two uint8 tensors that
    an integer op consumes and a module returns (so that :func:`.requant.deployed` models their
    requantization; a fixed point: dropping an add can drop the adds after it)."""
    cands = [n for n in roles.gm.graph.nodes if roles.is_producer(n)]
    hookable = modelable_adds(roles.gm, roles, [n for n in cands if roles.kind(n) == "add"])
    keep = {n: roles.kind(n) != "add" or n in hookable for n in cands}
    changed = True
    while changed:
        changed = False
        for n in cands:
            if roles.kind(n) != "add" or not keep[n]:
                continue
            ok = all(keep.get(roles.source(a), False) for a in n.args) and any(
                roles.kind(u) == "layer" or (roles.kind(u) == "add" and keep[u]) for u in roles.consumers(n))
            if not ok:
                keep[n], changed = False, True
    return [n for n in cands if keep[n]]


@torch.no_grad()
def _calibrate(gm: fx.GraphModule, nodes: list[fx.Node], calib: torch.Tensor, batch_size: int) -> dict[str, Grid]:
    """8-bit per-tensor grids for ``nodes``' outputs, MSE-calibrated on the fake-quant model."""
    observers = {n.name: ActQuantizer(8) for n in nodes}
    for q in observers.values():
        q.start_observing()

    class Observe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in observers:
                observers[n.name](out)
            return out

    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for i in range(0, len(calib), batch_size):
        Observe(gm).run(calib[i:i + batch_size].to(device))
    grids = {}
    for name, q in observers.items():
        q.finish_observing()
        grids[name] = Grid(float(np.float32(q.step.item())), 128 if bool(q.signed) else 0)
    return grids


def _consumer_grid(roles: _Roles, n: fx.Node) -> Grid | None:
    """A consuming layer's own input grid for producer ``n``'s output, where one fits: the only
    consumer's, or an 8-bit consumer's (its activation step was calibrated on this very tensor;
    the other consumers read 8 bits on it). ``None``: calibrate a grid. A fused ReLU needs an
    unsigned grid."""
    users = roles.consumers(n)
    layers = [roles.layers[u] for u in users if u in roles.layers]
    if len(users) == 1 and layers:
        candidates = layers
    else:
        candidates = [m for m in layers if m.act_quant.bits == 8]
    for m in candidates:
        grid = Grid.of(m.act_quant).full()
        if roles.fused_relu(n) is None or grid.zero_point == 0:
            return grid
    return None


def plan_integer(model: nn.Module, calib: DataLike, calib_size: int = 1024, batch_size: int = 128) -> IntegerPlan:
    """Decide which tensors of ``model`` stay uint8 and on which grid, calibrating the 8-bit
    requantization steps on up to ``calib_size`` inputs of ``calib`` (tensor, Dataset, DataLoader)."""
    calib = as_tensor(calib, limit=calib_size)
    model = model.eval()
    gm = trace(model)
    input_shape = ["N", *calib.shape[1:]]
    roles = _Roles(gm, node_facts(gm, input_shape))
    if not roles.layers:  # weight-only: nothing to requantize (MatMulNBits takes float inputs)
        return IntegerPlan({}, input_shape)
    producers = _integer_producers(roles)
    matched: dict[fx.Node, Grid] = {}
    to_calibrate = []
    for n in producers:
        grid = _consumer_grid(roles, n)
        if grid is not None:
            matched[n] = grid
        else:
            to_calibrate.append(roles.fused_relu(n) or n)
    calibrated = _calibrate(gm, to_calibrate, calib, batch_size)
    grids: dict[str, Grid] = {}
    for n in producers:
        relu = roles.fused_relu(n)
        grids[n.name] = matched.get(n) or calibrated[(relu or n).name]
        if relu is not None:
            grids[relu.name] = grids[n.name]
    for n in gm.graph.nodes:  # pass-through modules keep their input's grid
        if roles.kind(n) == "pass" and n.args[0].name in grids:
            grids[n.name] = grids[n.args[0].name]
    log.info("integer plan: %d uint8 tensors, %d calibrated 8-bit requantizations",
             len(grids), len(calibrated))
    return IntegerPlan(grids, input_shape)


# -- the simulation ---------------------------------------------------------------------------------
class IntegerSimulation(nn.Module):
    """``model`` computed as onnxruntime's integer graph computes it (see the module docstring).

    Integer tensors are carried as their dequantized float values, so every float op runs
    unchanged; integer layers and adds recover the codes, do the integer arithmetic in float64
    (exact) and round as the kernels do. ``IntegerSimulation(model, plan)(x)`` matches the
    ``kernels="int8"`` ONNX export of ``model`` with the same plan.
    """

    def __init__(self, model: nn.Module, plan: IntegerPlan) -> None:
        super().__init__()
        self.gm = trace(model.eval())
        self.plan = plan
        facts = node_facts(self.gm, plan.input_shape)
        self._roles = _Roles(self.gm, facts)
        resizes = {n: resize_spec(self.gm, n, facts) for n in self.gm.graph.nodes
                   if is_resize(self.gm, n) and n.args[0].name in plan.grids}
        self._code_resizes = {n: spec for n, spec in resizes.items() if spec.exact_on_codes()}
        missing = [k for k in plan.grids if k not in facts]
        if missing:
            raise ExportError(f"the integer plan names nodes this model does not have: {missing[:5]}")
        self._codes = {n: weight_codes(m).double() for n, m in self._roles.layers.items()}

    def _layer(self, n: fx.Node, x: torch.Tensor) -> torch.Tensor:
        m: QuantModule = self._roles.layers[n]
        grid, out = Grid.of(m.act_quant), self.plan.grids.get(n.name)
        q = grid.quantize(x).double() - grid.zero_point
        w = self._codes[n].to(x.device)
        acc = F.conv2d(q, w, None, **m.conv_kwargs) if m.kind == "conv" else F.linear(q, w)
        view = (1, -1) + (1,) * (acc.dim() - 2) if m.kind == "conv" else (-1,)
        if out is None:
            y = acc.float() * torch.from_numpy(accumulator_scale(m, grid)).to(x.device).view(view)
            return y if m.bias is None else y + m.bias.detach().float().view(view)
        b = int_bias(m, grid)
        if b is not None:
            acc = acc + torch.from_numpy(b).to(device=x.device, dtype=torch.float64).view(view)
        mult = torch.from_numpy(requant_multiplier(m, grid, out)).to(x.device).view(view)
        return out.dequantize((torch.round(acc.float() * mult) + out.zero_point).clamp(0, 255))

    def _add(self, n: fx.Node, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb, gc = (self.plan.grids[v.name] for v in (*n.args, n))
        return gc.dequantize(qadd_codes(ga.codes(a), ga, gb.codes(b), gb, gc))

    def _resize(self, n: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """Interpolation of the integer codes ``c - z``, exact, then one rounding: ``· s`` (:mod:`.resize`)."""
        grid = self.plan.grids[n.args[0].name]
        return self._code_resizes[n].interpolate(grid.codes(x) - grid.zero_point) * grid.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = self

        class Run(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n in sim._roles.layers:
                    return sim._layer(n, self.env[n.args[0]])
                if n in sim._code_resizes:
                    return sim._resize(n, self.env[n.args[0]])
                if n.name in sim.plan.grids and sim._roles.kind(n) == "add":
                    return sim._add(n, self.env[n.args[0]], self.env[n.args[1]])
                return super().run_node(n)

        with torch.no_grad():
            return Run(self.gm).run(x)

