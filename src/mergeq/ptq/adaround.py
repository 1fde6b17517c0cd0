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
            reg = (1.0 - mag.pow(beta)).sum()
            dreg = mag.pow(beta - 1.0).mul_(torch.sign(a)).mul_(-2.0 * beta).mul_(dh)
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
    """

    def __init__(self, w: torch.Tensor, step: torch.Tensor) -> None:
        super().__init__()
        self.V = nn.Parameter(init_v(w, step))
        self.soft = True
        self.beta: float | None = None
        self.reg: torch.Tensor | None = None
        self._floor_key: tuple | None = None

    def _floor(self, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        key = (id(w), w._version, id(step), step._version)
        if key != self._floor_key:
            self._w_floor, self._floor_key = torch.floor(w.detach() / step), key
        return self._w_floor

    def forward(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        if not self.soft:
            return self.hard(w, step, bits)
        lo, hi = qrange(bits, True)
        wq, self.reg = _SoftRound.apply(self.V, self._floor(w, step), step, lo, hi, self.beta)
        return wq

    def hard(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        lo, hi = qrange(bits, True)
        return torch.clamp(torch.floor(w / step) + (self.V >= 0).to(w.dtype), lo, hi) * step


@dataclass
class AdaRoundOptions(ReconOptions):
    iters: int = 20000
    round_weight: float = 0.01  # λ of the rounding regulariser
    warmup: float = 0.2  # fraction of iterations without regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0


class AdaRoundHooks(ReconHooks):
    def __init__(self, opts: AdaRoundOptions, learn_act: bool = True, quant_act: bool = True) -> None:
        self.o, self.learn_act, self.quant_act = opts, learn_act, quant_act

    def setup(self, layers: Layers) -> list[nn.Parameter]:
        for _, m in layers:
            m.w_quantizer = AdaRoundQuantizer(m.weight, m.w_step)
        return [m.w_quantizer.V for _, m in layers]

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        beta = None if t < self.o.warmup * iters else \
            beta_schedule(t, iters, self.o.warmup, self.o.beta_start, self.o.beta_end)
        for _, m in layers:
            m.w_quantizer.beta = beta

    def penalty(self, t: int, iters: int, layers: Layers):
        """λ Σ f_reg(V) at this step's β, computed by the layers' forward (0 during the warm-up)."""
        if layers[0][1].w_quantizer.beta is None:
            return 0.0
        return self.o.round_weight * sum(m.w_quantizer.reg for _, m in layers)

    def finish(self, layers: Layers) -> None:
        for _, m in layers:
            m.w_quantizer.soft, m.w_quantizer.beta, m.w_quantizer.reg = False, None, None


@PTQ_METHODS.register("adaround", options=AdaRoundOptions)
def adaround(qmodel: nn.Module, ctx: PTQContext) -> None:
    """Layer-wise AdaRound: weight-only reconstruction of each layer's output (activation steps
    keep their MSE initialisation and are applied at inference)."""
    opts = AdaRoundOptions.from_kwargs("adaround", ctx.options)
    reconstruct(qmodel, ctx, AdaRoundHooks(opts, learn_act=False, quant_act=False), opts, layerwise=True)
