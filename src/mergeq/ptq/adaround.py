"""AdaRound (Nagel et al., ICML 2020): learned up/down rounding, and the layer-wise method.

    w̃ = Δ · clamp(⌊w/Δ⌋ + h(V), q_min, q_max),   h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1),  ζ=1.1, γ=-0.1
    f_reg(V) = Σ 1 - |2h(V) - 1|^β                               (Eq. 23-24 of the paper)

V starts where h(V) = w/Δ - ⌊w/Δ⌋, so the initial hard rounding ⌊w/Δ⌋ + [h(V) ≥ 0.5] equals
round-to-nearest. The regulariser (weight λ = 0.01) is off for the first 20% of the iterations,
then β decays linearly from 20 to 2 (BRECQ/QDrop's LinearTempDecay). Final rounding:
⌊w/Δ⌋ + [V ≥ 0] (⇔ h(V) ≥ 0.5), clamped. V is trained with Adam (lr 1e-3).

``adaround`` reconstructs each QuantModule alone (its output, weight rounding only, its input
taken from the already quantized model); BRECQ and QDrop reuse :class:`AdaRoundHooks` per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import qrange
from ..registry import PTQ_METHODS
from .base import PTQContext
from .recon import Layers, ReconHooks, ReconOptions, reconstruct

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def init_v(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac(w/Δ): σ(V) = (frac - γ)/(ζ - γ)."""
    x = w.detach() / step
    rest = x - torch.floor(x)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def beta_schedule(t: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """β at step t: ``start`` until the end of the warm-up, then linear to ``end`` at t = iters."""
    t0 = warmup * iters
    if t <= t0:
        return start
    rel = min(1.0, (t - t0) / max(iters - t0, 1e-12))
    return end + (start - end) * (1.0 - rel)


def round_penalty(v: torch.Tensor, beta: float) -> torch.Tensor:
    """f_reg = Σ 1 - |2h(V) - 1|^β."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


class _SoftRound(torch.autograd.Function):
    """Soft AdaRound weight Δ·clamp(⌊w/Δ⌋ + h(V)) and, when β is given, f_reg(V), in one node."""

    @staticmethod
    def forward(ctx, v, w_floor, step, lo, hi, beta):
        # beta: a float, or a 0-dim tensor on v's device (a step captured as a CUDA graph)
        s = torch.sigmoid(v)
        h_raw = s * (ZETA - GAMMA) + GAMMA
        h = h_raw.clamp(0.0, 1.0)
        t = w_floor + h
        # ∂h/∂V = (ζ-γ)σ(1-σ) where 0 < h_raw < 1; ∂w̃/∂h = Δ where q_min < ⌊w/Δ⌋ + h < q_max
        dh = torch.ops.aten.hardtanh_backward(s * (1.0 - s) * (ZETA - GAMMA), h_raw, 0.0, 1.0)
        dw = torch.ops.aten.hardtanh_backward(dh * step, t, float(lo), float(hi))
        reg, dreg = v.new_zeros(()), None
        if beta is not None:
            a = 2.0 * h - 1.0
            mag = a.abs()
            p = mag.pow(beta - 1.0)
            # f_reg's value only reaches the logged loss (its gradient is dreg), so |a|^β is
            # |a|^(β-1)·|a| (one pow instead of two; it may differ from pow(|a|, β) in the last bit)
            reg = torch.rsub(p * mag, 1.0).sum()
            dreg = p.mul_(torch.sign(a)).mul_(-2.0 * beta).mul_(dh)
        ctx.save_for_backward(dw, dreg)
        return t.clamp_(lo, hi).mul_(step), reg

    @staticmethod
    def backward(ctx, g_w, g_reg):
        dw, dreg = ctx.saved_tensors
        g = g_w * dw
        if dreg is not None:
            g = g.add_(dreg * g_reg)
        return g, None, None, None, None, None


class AdaRoundQuantizer(nn.Module):
    """w_quantizer with learnable rounding V; ``soft=False`` uses the hard rounding.

    The weight is frozen while V trains, so ⌊w/Δ⌋ is computed once (again only if ``w`` or Δ
    change in place). While ``beta`` is set (the hooks set it after the warm-up), the soft
    forward also leaves f_reg(V) at that β in ``reg``, computed in the same fused node.
    During reconstruction the quantizers of a unit's layers belong to one :class:`SoftRoundGroup`,
    which computes all their soft weights in one node per step.
    """

    def __init__(self, w: torch.Tensor, step: torch.Tensor) -> None:
        super().__init__()
        self.V = nn.Parameter(init_v(w, step))
        self.soft = True
        self.beta: float | None = None
        self.reg: torch.Tensor | None = None
        self._floor_key: tuple | None = None
        self.group: SoftRoundGroup | None = None  # plain attribute: not a submodule

    def _floor(self, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        key = (id(w), w._version, id(step), step._version)
        if key != self._floor_key:
            self._w_floor, self._floor_key = torch.floor(w.detach() / step), key
        return self._w_floor

    def forward(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        if not self.soft:
            return self.hard(w, step, bits)
        if self.group is not None:
            out = self.group.weight(self, w, step, bits)
            if out is not None:
                return out
        lo, hi = qrange(bits, True)
        beta = self.group.beta if self.group is not None else self.beta
        wq, self.reg = _SoftRound.apply(self.V, self._floor(w, step), step, lo, hi, beta)
        return wq

    def hard(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        lo, hi = qrange(bits, True)
        return torch.clamp(torch.floor(w / step) + (self.V >= 0).to(w.dtype), lo, hi) * step


class SoftRoundGroup:
    """The soft AdaRound weights of a unit's layers (one bit width) computed as one
    :class:`_SoftRound` node over their V's laid end to end, once per optimisation step.

    The node is element-wise, so every layer's soft weight, its gradient and f_reg's gradient
    are those of the per-layer nodes bit for bit (f_reg's value, one sum instead of one per
    layer, may differ in the last bit; its gradient is λ·∂f_reg/∂V either way). It saves the
    dozen small operations per layer and step the per-layer nodes cost, forward and backward.
    Within a step (V unchanged since :meth:`new_step`) every later use gets the same tensors:
    TTAQ's PEM term and its perturbed pass share the step's soft weights, and their gradients
    add up in one backward through the shared node.
    """

    def __init__(self, members: list[tuple[AdaRoundQuantizer, nn.Module]], bits: int) -> None:
        self.qs = [q for q, _ in members]
        self.mods = [m for _, m in members]
        self.index = {id(q): k for k, q in enumerate(self.qs)}
        self.sizes = [m.weight.numel() for m in self.mods]
        self.lo, self.hi = qrange(bits, True)
        self.bits, self.beta = bits, None
        self.reg: torch.Tensor | None = None
        self._const_key: tuple | None = None
        self._out: tuple | None = None
        self._in_step = False  # between new_step calls: the step's soft weights are shared
        for q in self.qs:
            q.group = self

    def new_step(self, beta: float | torch.Tensor | None) -> None:
        """A step begins: β for it; the soft weights are computed again at the first use."""
        self.beta, self._out, self.reg, self._in_step = beta, None, None, True

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """⌊w/Δ⌋ and Δ of every weight element, laid end to end (recomputed only if w or Δ change)."""
        key = tuple((id(m.weight), m.weight._version, id(m.w_step), m.w_step._version) for m in self.mods)
        if key != self._const_key:
            floor = [q._floor(m.weight, m.w_step).reshape(-1) for q, m in zip(self.qs, self.mods)]
            step = [m.w_step.detach().expand_as(m.weight).reshape(-1) for m in self.mods]
            self._floor, self._step = (floor[0], step[0]) if len(floor) == 1 else (torch.cat(floor), torch.cat(step))
            self._const_key = key
        return self._floor, self._step

    def weight(self, q: AdaRoundQuantizer, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor | None:
        """``q``'s soft weight of this step (None: not the group's weight; the caller computes it)."""
        k = self.index[id(q)]
        m = self.mods[k]
        if w is not m.weight or step is not m.w_step or bits != self.bits:
            return None
        key = (tuple(x._parameters["V"]._version for x in self.qs), torch.is_grad_enabled())
        if not self._in_step or self._out is None or self._out[0] != key:
            floor, step_all = self._constants()
            vs = [x._parameters["V"].reshape(-1) for x in self.qs]
            v = vs[0] if len(vs) == 1 else torch.cat(vs)
            wq, self.reg = _SoftRound.apply(v, floor, step_all, self.lo, self.hi, self.beta)
            self._out = (key, [p.view(x.weight.shape) for p, x in zip(wq.split(self.sizes), self.mods)])
        return self._out[1][k]

    def release(self) -> None:
        for q in self.qs:
            q.group = None
        self._out, self.reg, self._in_step = None, None, False


@dataclass
class AdaRoundOptions(ReconOptions):
    iters: int = 20000
    round_weight: float = 0.01  # λ of the rounding regulariser
    warmup: float = 0.2  # fraction of iterations without regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0


class AdaRoundHooks(ReconHooks):
    graph_safe = True  # β from scalars, the warm-up as the phase

    def __init__(self, opts: AdaRoundOptions, learn_act: bool = True, quant_act: bool = True) -> None:
        self.o, self.learn_act, self.quant_act = opts, learn_act, quant_act
        self.groups: list[SoftRoundGroup] = []

    def setup(self, layers: Layers) -> list[nn.Parameter]:
        by_bits: dict[int, list] = {}
        for _, m in layers:
            m.w_quantizer = AdaRoundQuantizer(m.weight, m.w_step)
            by_bits.setdefault(m.w_bits, []).append((m.w_quantizer, m))
        self.groups = [SoftRoundGroup(members, bits) for bits, members in by_bits.items()]
        return [m.w_quantizer.V for _, m in layers]

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        beta = None if t < self.o.warmup * iters else \
            self.scalars("beta", beta_schedule(t, iters, self.o.warmup, self.o.beta_start, self.o.beta_end))
        for g in self.groups:
            g.new_step(beta)

    def phase(self, t: int, iters: int) -> bool:
        """Whether the rounding regulariser is on (after the warm-up)."""
        return t >= self.o.warmup * iters

    def penalty(self, t: int, iters: int, layers: Layers):
        """λ Σ f_reg(V) at this step's β, computed by the layers' forward (0 during the warm-up)."""
        if not self.groups or self.groups[0].beta is None:
            return 0.0
        reg = self.groups[0].reg if len(self.groups) == 1 else sum(g.reg for g in self.groups)
        return self.o.round_weight * reg

    def finish(self, layers: Layers) -> None:
        for g in self.groups:
            g.release()
        self.groups = []
        for _, m in layers:
            m.w_quantizer.soft, m.w_quantizer.beta, m.w_quantizer.reg = False, None, None


@PTQ_METHODS.register("adaround", options=AdaRoundOptions)
def adaround(qmodel: nn.Module, ctx: PTQContext) -> None:
    """Layer-wise AdaRound: weight-only reconstruction of each layer's output (activation steps
    keep their MSE initialisation and are applied at inference)."""
    opts = AdaRoundOptions.from_kwargs("adaround", ctx.options)
    reconstruct(qmodel, ctx, AdaRoundHooks(opts, learn_act=False, quant_act=False), opts, layerwise=True)
