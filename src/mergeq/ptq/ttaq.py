"""TTAQ's PTQ side (Xiao et al., "TTAQ: Towards Stable Post-training Quantization in Continuous
Domain Adaptation", arXiv 2412.09899, Sec. 3.2-3.3): QDrop reconstruction + PEM + PCR.

Only the paper's abstract and summaries could be read here (the method section was not
reachable from this machine), so the two terms below are our reading of it; the choices are
marked and every constant is an option.

* **Base**: QDrop's block loop (ptq.recon, AdaRound rounding, LSQ activation steps, drop
  probability 0.5), as the paper builds on QDrop-style block reconstruction.
* **PEM** (perturbation error mitigation, Sec. 3.2). For a layer with quantized weight Ŵ and an
  input perturbed by δ (domain shift), the output error is (Ŵ - W)x + Ŵδ; for isotropic δ of
  variance σ², E‖Ŵδ‖² = σ²‖Ŵ‖²_F, so at a fixed reconstruction error the output SNR
  ‖Wx‖² / E‖Ŵδ‖² rises as ‖Ŵ‖_F falls. PEM adds the weight regulariser

      λ_pem Σ_layers ‖Ŵ_l‖²_F / ‖W_l‖²_F

  on the soft AdaRound weights Ŵ_l (gradient through h(V): it favours rounding towards zero
  where the reconstruction error allows). *Choice*: squared Frobenius norm (a smooth upper
  bound of the spectral norm that bounds ‖Ŵδ‖/‖δ‖), normalised by the FP weight's norm so that
  λ is scale free and layers weigh alike; on from the first step.
* **PCR** (perturbation consistency reconstruction, Sec. 3.3): a consistency loss between the
  quantized unit's outputs on its input x and on x + δ, δ = σ_pcr · std(x) · ε, ε ~ N(0, I)
  (std over each sample's elements), both passes with the same QDrop masks:

      λ_pcr · D(sg[F_q(x)], F_q(x + δ))

  with D the KL divergence of the softmax outputs for a unit that outputs logits (B x K, the
  classifier head: the paper's KL consistency of predictions) and the reconstruction metric
  ‖·‖² of rec_loss for feature maps (``pcr_kind="auto"``; ``"kl"`` applies a channel softmax
  everywhere, ``"mse"`` the squared error everywhere). *Choices*: the paper does not say how
  it treats intermediate feature maps; the clean output is a stop-gradient target (as in
  consistency training); the term is exactly zero when σ_pcr = 0. The clean output is the
  step's own forward, and the perturbed pass reuses its QDrop masks, so PCR costs one extra
  forward + backward per step (``ttaq`` takes about twice QDrop's time).

Defaults λ_pem = 0.5, λ_pcr = 0.1, σ_pcr = 0.1 are ours, not the paper's (unknown to us): on the
digits ResNet-8 at W4A4 they make the PCR term 10-25% of the reconstruction error of the middle
units at their first step, and the PEM term about 0.5 per layer (its gradient reaches only the
rounding choices, so it can at most move a weight by one grid step towards zero).
BatchNorm: TTAQ adapts BN at test time, so quantize with ``QuantConfig(fold_bn=False)``: BN
stays a module after each quantized conv, runs on its running statistics (eval mode) during
reconstruction, and test-time adaptation (``mergeq.adapt.tta``) trains only its affine terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PTQ_METHODS
from .adaround import AdaRoundHooks, AdaRoundOptions
from .base import PTQContext
from .recon import Layers, reconstruct, rec_loss

PCR_KINDS = ("auto", "kl", "mse")


def pem_penalty(w_q: torch.Tensor, w_fp: torch.Tensor) -> torch.Tensor:
    """‖Ŵ‖²_F / ‖W‖²_F (one layer's PEM term, without λ)."""
    return w_q.pow(2).sum() / w_fp.detach().pow(2).sum().clamp_min(1e-12)


def consistency(clean: torch.Tensor, pert: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """D(clean, pert): KL(softmax(clean) ‖ softmax(pert)) over dim 1 averaged over the rest (``kl``),
    or rec_loss (``mse``); ``auto``: KL for B x K outputs (logits), rec_loss for feature maps."""
    if kind == "auto":
        kind = "kl" if clean.dim() == 2 else "mse"
    if kind == "mse":
        return rec_loss(pert, clean)
    if kind != "kl":
        raise ValueError(f"PCR kind must be one of {PCR_KINDS}, got {kind!r}")
    if clean.dim() < 2:
        raise ValueError(f"PCR needs outputs with a channel dimension, got shape {tuple(clean.shape)}")
    log_p, log_q = F.log_softmax(clean, dim=1), F.log_softmax(pert, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def sample_std(x: torch.Tensor) -> torch.Tensor:
    """Each sample's standard deviation over its elements (population form), shaped to broadcast
    against ``x``: ‖x - mean‖₂ / √n, a mean and a norm (``torch.std``'s Welford pass took 3 ms
    against 0.3 ms for a 32 x 16 x 32 x 32 batch on one CPU thread; the two agree to float
    rounding, a relative 1e-6)."""
    x = x.detach()
    dims = tuple(range(1, x.dim()))
    centred = x - x.mean(dims, keepdim=True)
    return torch.linalg.vector_norm(centred, dim=dims, keepdim=True).div_(math.sqrt(x.numel() // x.shape[0]))


def pcr_loss(forward, x: torch.Tensor, x_fp: torch.Tensor | None, out: torch.Tensor, sigma: float,
             kind: str = "auto") -> torch.Tensor:
    """PCR term D(sg[out], F(x + δ)) for ``out = forward(x, x_fp)``, the step's own forward (the
    clean pass costs nothing). The perturbed pass moves both inputs by the same δ and gets the
    clean pass's QDrop masks from the loop's ``forward`` (a second pass of the step reuses them as
    they are and draws no random numbers), so both passes share them."""
    delta = torch.randn_like(x).mul_(sample_std(x).mul_(sigma))
    pert = forward(x + delta, None if x_fp is None else x_fp + delta)
    return consistency(out.detach(), pert, kind)


@dataclass
class TTAQOptions(AdaRoundOptions):
    drop_prob: float = 0.5  # QDrop
    pem: bool = True
    pem_lambda: float = 0.5
    pcr: bool = True
    pcr_weight: float = 0.1
    pcr_sigma: float = 0.1
    pcr_kind: str = "auto"

    def __post_init__(self) -> None:
        if self.pcr_kind not in PCR_KINDS:
            raise ValueError(f"ttaq: pcr_kind must be one of {PCR_KINDS}, got {self.pcr_kind!r}")
        if self.pem_lambda < 0 or self.pcr_weight < 0 or self.pcr_sigma < 0:
            raise ValueError(f"ttaq: pem_lambda, pcr_weight and pcr_sigma must be >= 0, got {self}")


class TTAQHooks(AdaRoundHooks):
    """Within a step the clean forward, PEM and the perturbed pass share each layer's soft
    AdaRound weight (computed once: ptq.adaround.SoftRoundGroup) and the QDrop masks (drawn
    once: ptq.recon), and ‖W‖²_F of the frozen FP weights is computed once per unit."""

    def __init__(self, opts: TTAQOptions, learn_act: bool = True) -> None:
        super().__init__(opts, learn_act=learn_act)
        self._fp_norm = {}

    def setup(self, layers: Layers) -> list[nn.Parameter]:
        self._fp_norm = {id(m): m.weight.detach().pow(2).sum().clamp_min(1e-12) for _, m in layers}
        return super().setup(layers)

    def penalty(self, t: int, iters: int, layers: Layers):
        loss = super().penalty(t, iters, layers)
        if self.o.pem and self.o.pem_lambda > 0:  # pem_penalty with the FP norms computed once
            loss = loss + self.o.pem_lambda * sum(m.quantized_weight().pow(2).sum() / self._fp_norm[id(m)]
                                                  for _, m in layers)
        return loss

    def unit_loss(self, t: int, iters: int, forward, x: torch.Tensor, x_fp: torch.Tensor, out: torch.Tensor):
        if not (self.o.pcr and self.o.pcr_weight > 0):
            return 0.0
        return self.o.pcr_weight * pcr_loss(forward, x, x_fp, out, self.o.pcr_sigma, self.o.pcr_kind)

    def finish(self, layers: Layers) -> None:
        self._fp_norm = {}
        super().finish(layers)


@PTQ_METHODS.register("ttaq", options=TTAQOptions)
def ttaq(qmodel: nn.Module, ctx: PTQContext) -> None:
    """QDrop + PEM + PCR (see the module docstring). Quantize with ``fold_bn=False`` for TTA."""
    opts = TTAQOptions.from_kwargs("ttaq", ctx.options)
    reconstruct(qmodel, ctx, TTAQHooks(opts, learn_act=ctx.config.a_bits is not None), opts)
