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

import math
from dataclasses import dataclass

import torch
from torch import nn

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
    act_noise: bool = False  # reference code: activation quantizers noisy during the noise phase too
    train_w_step: bool = False  # reference code: the weight step Δ trained with the weights


class HDRQHooks(ReconHooks):
    def __init__(self, opts: HDRQOptions, source: nn.Module | None) -> None:
        self.o, self.source = opts, source
        kind = "empirical" if opts.noise is True else (opts.noise or None)
        if kind is not None and kind not in NOISE_KINDS:
            raise ValueError(f"hdrq: noise must be True, False or one of {NOISE_KINDS}, got {opts.noise!r}")
        if opts.act_noise and kind is None:
            raise ValueError("hdrq: act_noise needs weight noise on (noise='empirical' or 'uniform')")
        self.kind, self.src = kind, {}

    def setup(self, layers: Layers) -> list[torch.Tensor]:
        for name, m in layers:
            m.w_quantizer = NoiseQuantizer(self.kind)
            if self.o.distance:
                w_src = self.source.get_submodule(name).weight.detach()
                if w_src.shape != m.weight.shape:
                    raise ValueError(f"hdrq: source layer {name!r} has shape {tuple(w_src.shape)}, "
                                     f"expected {tuple(m.weight.shape)}")
                self.src[name] = w_src.to(m.weight.device)
        return [m.weight for _, m in layers] + ([m.w_step for _, m in layers] if self.o.train_w_step else [])

    def lr_factor(self, t: int, iters: int) -> float:
        return warmup_cosine(t, iters, self.o.lr_warmup)

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        noisy = self.kind is not None and t < iters - round(self.o.switch_frac * iters)
        for _, m in layers:
            m.w_quantizer.noisy = noisy
            if self.o.act_noise and m.act_quant is not None:
                m.act_quant.noise = self.kind if noisy else None

    def penalty(self, t: int, iters: int, layers: Layers):
        if not self.o.distance:
            return 0.0
        return sum(distance_penalty(m.weight, self.src[n], self.o.dist_lambda, self.o.dist_squared)
                   for n, m in layers)

    def finish(self, layers: Layers) -> None:
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
    reconstruct(qmodel, ctx, HDRQHooks(opts, ctx.source), opts)
