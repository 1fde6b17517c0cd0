"""HDRQ (Hessian and Distance Regularizing Quantization), Sec. 4.1-4.2 and 5 of the paper.

QDrop's block loop (ptq.recon with drop_prob 0.5; activation steps learned by LSQ) in which the
weights themselves are trained (no AdaRound V):

* noise-based quantization (Eq. 8-9): the forward uses clamp(w) + ε, ε sampled fresh every
  step from the quantization error (ptq.noise; ``noise="empirical"`` as the authors' code and
  the paper's text, ``"uniform"`` as the paper's U[-Δ/2, Δ/2] idealisation, ``False`` off: STE
  fake quantization throughout). For the last ``switch_frac`` = 3,500/20,000 of the iterations
  (code: 4,000/20,000 = 0.2) the forward switches to real fake quantization (round with STE).
* distance regularisation (Eq. 10): + λ Σ_layers ‖w - w_src‖₂, λ = 5e-2, against the source
  model after the same BN folding (the reference code's plain norm; ``dist_squared=True`` uses
  ‖w - w_src‖²₂). Gradient: λ(w - w_src)/‖w - w_src‖ (squared: 2λ(w - w_src)).
  Two measured alternatives (issue 21, RESULTS §3f), off by default: ``dist_relative`` scales
  the term to the unit (each step, each layer's distance gradient is λ·‖∇_w L_rec‖, so λ is the
  share of the reconstruction gradient instead of an absolute weight the 3-bit layers hardly
  feel); ``anchor="expert_bn"`` folds the source's weights with the expert's own BatchNorm
  (the paper's ``"source"`` folds them with the source's), so the term sees the weights SHOT
  changed, not the normalisation it re-estimated.
* Adam, lr 1e-3 (paper; code 1e-4) with linear warm-up from 1e-3·lr over the first 20% of the
  steps and cosine annealing to 0 after (the code's CosineWithWarmup).

The final weights are the trained weights rounded to nearest on the per-channel grid.
Reference-code choices, as options (defaults follow the paper): ``act_noise`` makes the
activation quantizers noisy too during the noise phase (its noise fake-quantizer for
activations, QDrop's dropping on top); ``train_w_step`` trains the weight step Δ together
with the weights (same Adam group and schedule, no LSQ gradient scale: the code's per-tensor
HDRQFakeQuantize scale; ours stays per channel); ``lr=1e-4`` is the code's learning rate.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import fold_bn
from ..quant import fake_quantize, quantize_int
from ..registry import PTQ_METHODS
from .base import PTQContext
from .noise import NOISE_KINDS, noisy_weight
from .recon import Layers, ReconHooks, ReconOptions, reconstruct


def distance_penalty(w: torch.Tensor, w_src: torch.Tensor, lam: float, squared: bool = False) -> torch.Tensor:
    """Eq. 10 term: λ‖w - w_src‖₂ (or λ‖w - w_src‖²₂)."""
    d = (w - w_src).flatten()
    return lam * (d.pow(2).sum() if squared else torch.linalg.vector_norm(d))


def warmup_cosine(t: int, iters: int, warmup: float = 0.2, start: float = 1e-3) -> float:
    """LR multiplier: linear from ``start`` to 1 over ``warmup``·iters steps, then cosine to 0."""
    n_warm = warmup * iters
    if t < n_warm:
        return start + (1.0 - start) * t / n_warm
    return 0.5 * (1.0 + math.cos(math.pi * (t - n_warm) / max(iters - n_warm, 1e-12)))


class NoiseQuantizer(nn.Module):
    """w_quantizer: clamp(w)+ε while ``noisy`` (Eq. 8-9), else fake quantization with STE."""

    def __init__(self, kind: str | None) -> None:
        super().__init__()
        self.kind, self.noisy = kind, kind is not None

    def forward(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        if step.requires_grad:  # option train_w_step: keep Δ positive
            step = step.abs().clamp_min(1e-8)
        return noisy_weight(w, step, bits, self.kind) if self.noisy else fake_quantize(w, step, bits)

    def hard(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize_int(w, step, bits) * step


ANCHORS = ("source", "expert_bn")


@dataclass
class HDRQOptions(ReconOptions):
    iters: int = 20000
    lr: float = 1e-3
    drop_prob: float = 0.5
    noise: bool | str = "empirical"  # True = "empirical"; "uniform"; False = no noise (STE)
    switch_frac: float = 3500 / 20000
    lr_warmup: float = 0.2
    distance: bool = True
    dist_lambda: float = 5e-2
    dist_squared: bool = False
    dist_relative: bool = False  # λ as a share of the reconstruction gradient (per layer, per step)
    anchor: str = "source"  # "source" (paper) or "expert_bn": the source's weights folded with the expert's BN
    act_noise: bool = False  # reference code: activation quantizers noisy during the noise phase too
    train_w_step: bool = False  # reference code: the weight step Δ trained with the weights

    def __post_init__(self) -> None:
        if self.noise not in (True, False, *NOISE_KINDS):
            raise ValueError(f"hdrq: noise must be True, False or one of {NOISE_KINDS}, got {self.noise!r}")
        if self.act_noise and self.noise_kind is None:
            raise ValueError("hdrq: act_noise needs weight noise on (noise='empirical' or 'uniform')")
        if self.anchor not in ANCHORS:
            raise ValueError(f"hdrq: anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.dist_relative and self.dist_squared:
            raise ValueError("hdrq: dist_relative sets the size of the distance gradient itself; dist_squared "
                             "has no meaning with it (set one of them)")

    @property
    def noise_kind(self) -> str | None:
        """The weight noise (:data:`NOISE_KINDS`), None without noise."""
        return "empirical" if self.noise is True else (self.noise or None)


class HDRQHooks(ReconHooks):
    graph_safe = True  # the noise switch as the phase; nothing else changes per step

    def __init__(self, opts: HDRQOptions, source: nn.Module | None) -> None:
        self.o, self.source = opts, source
        self.kind, self.src, self.handles = opts.noise_kind, {}, []

    def setup(self, layers: Layers) -> list[torch.Tensor]:
        for name, m in layers:
            m.w_quantizer = NoiseQuantizer(self.kind)
            if self.o.distance:
                w_src = self.source.get_submodule(name).weight.detach()
                if w_src.shape != m.weight.shape:
                    raise ValueError(f"hdrq: source layer {name!r} has shape {tuple(w_src.shape)}, "
                                     f"expected {tuple(m.weight.shape)}")
                self.src[name] = w_src.to(m.weight.device)
                if self.o.dist_relative:
                    m.weight.requires_grad_(True)  # trained anyway; a hook needs it now
                    self.handles.append(m.weight.register_hook(self._relative(name, m.weight)))
        return [m.weight for _, m in layers] + ([m.w_step for _, m in layers] if self.o.train_w_step else [])

    def lr_factor(self, t: int, iters: int) -> float:
        return warmup_cosine(t, iters, self.o.lr_warmup)

    def phase(self, t: int, iters: int) -> bool:
        """Whether the weights are noisy (Eq. 8-9) rather than fake-quantized at step ``t``."""
        return self.kind is not None and t < iters - round(self.o.switch_frac * iters)

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        noisy = self.phase(t, iters)
        for _, m in layers:
            m.w_quantizer.noisy = noisy
            if self.o.act_noise and m.act_quant is not None:
                m.act_quant.noise = self.kind if noisy else None

    def _relative(self, name: str, w: torch.Tensor):
        """Gradient hook: the reconstruction gradient g plus λ‖g‖·(w − w_src)/‖w − w_src‖."""
        def hook(g: torch.Tensor) -> torch.Tensor:
            d = w.detach() - self.src[name]
            n = torch.linalg.vector_norm(d)  # d/n is 0 where w = w_src; no branch reads the device
            unit_d = torch.where(n > 0, d / n, torch.zeros_like(d))
            return g + self.o.dist_lambda * torch.linalg.vector_norm(g) * unit_d
        return hook

    def penalty(self, t: int, iters: int, layers: Layers):
        if not self.o.distance or self.o.dist_relative:  # the relative form acts in the gradient hook
            return 0.0
        return sum(distance_penalty(m.weight, self.src[n], self.o.dist_lambda, self.o.dist_squared)
                   for n, m in layers)

    def finish(self, layers: Layers) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for _, m in layers:
            m.w_quantizer.noisy = False
            if m.act_quant is not None:
                m.act_quant.noise = None
            if self.o.train_w_step:
                m.w_step.requires_grad_(False)
                m.w_step.data = m.w_step.data.abs().clamp_min(1e-8)


@PTQ_METHODS.register("hdrq", options=HDRQOptions)
def hdrq(qmodel: nn.Module, ctx: PTQContext) -> None:
    opts = HDRQOptions.from_kwargs("hdrq", ctx.options)
    if opts.distance and ctx.source is None:
        raise ValueError("hdrq: the distance regulariser (Eq. 10) needs the source model: pass "
                         "quantize(..., source=source_model), or distance=False to switch it off")
    source = ctx.source
    if opts.distance and opts.anchor == "expert_bn" and ctx.config.fold_bn:
        source = expert_bn_anchor(ctx.raw_source, ctx.raw_model, ctx.calib[:2].to(ctx.device))
    reconstruct(qmodel, ctx, HDRQHooks(opts, source), opts)


def expert_bn_anchor(source: nn.Module, expert: nn.Module, example: torch.Tensor) -> nn.Module:
    """The source's weights folded with ``expert``'s BatchNorm (affine and running statistics, by
    module name): the distance anchor of ``anchor="expert_bn"``."""
    anchor = copy.deepcopy(source)
    bns = {n: m for n, m in expert.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, m in anchor.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if name not in bns:
                raise ValueError(f"hdrq: anchor='expert_bn': the expert has no BatchNorm {name!r} (the source has)")
            m.load_state_dict(bns[name].state_dict())
    return fold_bn(anchor, example).requires_grad_(False)
