"""Pseudo-quantization noise for HDRQ (Sec. 4.1, Eq. 8-9).

ŵ = clamp(round(w/Δ), q_min, q_max)·Δ (Eq. 8). Training uses w + ε instead of ŵ, with ε drawn
from the quantization error, so E[L(w + ε)] ≈ L(w) + ½ E[εᵀ∇²L ε] penalises curvature (Eq. 9):

* ``empirical`` (the authors' code): a 256-bin histogram on [-½, ½] of the tensor's own
  rounding residuals (w - ŵ)/Δ over the weights inside the clipping range; a bin is drawn with
  probability ∝ its count (inverse CDF, equivalent to ``torch.multinomial``) plus a uniform
  offset within the bin, then scaled by each channel's Δ;
* ``uniform`` (the paper's idealisation): ε ~ U[-Δ/2, Δ/2] per channel.

Weights outside the clipping range [q_min·Δ, q_max·Δ] are clamped to it and get no noise (their
quantization error is zero once clamped), as in the reference code.
"""
from __future__ import annotations

import torch

from ..quant import qrange, quantize_int

NOISE_KINDS = ("empirical", "uniform")


def residuals(w: torch.Tensor, step: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((w - ŵ)/Δ, mask of weights strictly inside the clipping range)."""
    lo, hi = qrange(bits, True)
    x = w.detach() / step
    inside = (x > lo) & (x < hi)
    return x - quantize_int(w.detach(), step, bits), inside


def sample_uniform(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """ε ~ U[-Δ/2, Δ/2] element-wise (Δ per channel)."""
    return (torch.rand_like(w) - 0.5) * step


def sample_empirical(w: torch.Tensor, step: torch.Tensor, bits: int, bins: int = 256) -> torch.Tensor:
    """ε drawn from the 256-bin histogram of the tensor's own rounding residuals, times Δ."""
    r, inside = residuals(w, step, bits)
    hist = torch.histc(r[inside].float(), bins=bins, min=-0.5, max=0.5)
    if hist.sum() <= 0:
        return sample_uniform(w, step)
    cdf = torch.cumsum(hist, 0)
    u = torch.rand(w.numel(), device=w.device) * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True).clamp_max(bins - 1)
    frac = (idx.to(w.dtype) + torch.rand(w.numel(), device=w.device, dtype=w.dtype)) / bins - 0.5
    return frac.view_as(w) * step


def noisy_weight(w: torch.Tensor, step: torch.Tensor, bits: int, kind: str = "empirical") -> torch.Tensor:
    """clamp(w, q_min·Δ, q_max·Δ) + ε, with ε = 0 where w was clamped; gradient 1 inside the range."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    lo, hi = qrange(bits, True)
    with torch.no_grad():
        eps = sample_empirical(w, step, bits) if kind == "empirical" else sample_uniform(w, step)
        _, inside = residuals(w, step, bits)
        eps = torch.where(inside, eps, torch.zeros_like(eps))
    return torch.clamp(w, lo * step, hi * step) + eps
