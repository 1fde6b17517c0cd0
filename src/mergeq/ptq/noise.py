"""Pseudo-quantization noise for HDRQ (Sec. 4.1, Eq. 8-9).

ŵ = clamp(round(w/Δ), q_min, q_max)·Δ (Eq. 8). Training uses w + ε instead of ŵ, with ε drawn
from the quantization error, so E[L(w + ε)] ≈ L(w) + ½ E[εᵀ∇²L ε] penalises curvature (Eq. 9):

* ``empirical`` (the authors' code): a 256-bin histogram on [-½, ½] of the tensor's own
  rounding residuals (w - ŵ)/Δ over the weights inside the clipping range; a bin is drawn with
  probability ∝ its count (inverse CDF, equivalent to ``torch.multinomial``) plus a uniform
  offset within the bin, then scaled by each channel's Δ. The histogram is rebuilt at every
  step, as the reference code does: HDRQ trains the weights, so their residuals move;
* ``uniform`` (the paper's idealisation): ε ~ U[-Δ/2, Δ/2] per channel.

Weights outside the clipping range [q_min·Δ, q_max·Δ] are clamped to it and get no noise (their
quantization error is zero once clamped), as in the reference code. The reference code draws
from the histogram of ŵ - w (the mirror image of the paper's w - ŵ); we follow the paper.
The same noise applies to activations on their unsigned or signed grid (``noisy_quant``), the
reference code's noise fake-quantizer for activations (HDRQ option ``act_noise``).
"""
from __future__ import annotations

import torch

from ..quant import qrange

NOISE_KINDS = ("empirical", "uniform")


def residuals(w: torch.Tensor, step: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((w - ŵ)/Δ, mask of weights strictly inside the clipping range) on a signed ``bits`` grid."""
    r, inside = _residuals(w, step, *qrange(bits, True))
    return r, inside.bool()


def _residuals(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((x - x̂)/Δ, 0/1 float mask of q_min < x/Δ < q_max), in five element-wise ops."""
    v = x.detach() / step.detach()
    inside = torch.ops.aten.hardtanh_backward(torch.ones_like(v), v, float(lo), float(hi))
    return v - torch.round(v).clamp_(lo, hi), inside


def sample_uniform(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """ε ~ U[-Δ/2, Δ/2] element-wise (Δ per channel)."""
    return (torch.rand_like(w) - 0.5) * step


def sample_empirical(w: torch.Tensor, step: torch.Tensor, bits: int, bins: int = 256) -> torch.Tensor:
    """ε drawn from the 256-bin histogram of the tensor's own rounding residuals, times Δ."""
    r, inside = _residuals(w, step, *qrange(bits, True))
    return _sample_hist(r, inside, bins) * step


def _sample_hist(r: torch.Tensor, inside: torch.Tensor, bins: int) -> torch.Tensor:
    """Draws from the histogram of ``r`` over ``inside`` (uniform if that is empty), shaped like r.

    Elements outside are moved out of the histogram's range (histc ignores them). A bin is drawn
    by inverse CDF, then a uniform offset within it. No branch reads a device value, so the step
    never waits for the device.

    The inverse CDF is ``searchsorted(cdf, u, right=True)``, the number of cumulative counts
    ≤ u. On the CPU the same index is read from a table instead (binary search runs element by
    element there, 2.2 against 0.65 ms for a 64 x 64 x 3 x 3 weight): the counts are integers,
    so cdf[i] ≤ u exactly when cdf[i] ≤ ⌊u⌋, and table[k] = #{i: cdf[i] ≤ k} is bin j for the
    cdf[j-1] ≤ k < cdf[j] (``repeat_interleave`` of the bin numbers by their counts), and the
    last bin also at k = total (u may round up to it; searchsorted's index there is clamped to
    the last bin). Exact while the float32 counts are (fewer than 2^24 elements); the same random
    numbers are drawn, so both give the same ε bit for bit (tests/test_recon_speed.py).
    """
    outside = torch.rsub(inside, 1.0).mul_(2.0)  # 2 outside, 0 inside: r + 0 is exactly r
    hist = torch.histc(outside.add_(r).float(), bins=bins, min=-0.5, max=0.5)
    hist = hist.add_((hist.sum() == 0).to(hist.dtype))  # nothing inside: uniform
    cdf = torch.cumsum(hist, 0)
    n = r.numel()
    u = torch.rand(n, device=r.device).mul_(cdf[-1])
    if r.device.type == "cpu" and n < 2**24:
        counts = hist.to(torch.int64)
        counts[-1] += 1  # table[total] = the last bin
        table = torch.repeat_interleave(torch.arange(bins, device=r.device), counts)
        idx = torch.index_select(table, 0, u.to(torch.int64))  # u ≥ 0: the cast is ⌊u⌋
    else:
        idx = torch.searchsorted(cdf, u, right=True).clamp_max_(bins - 1)
    frac = torch.rand(n, device=r.device, dtype=r.dtype).add_(idx).div_(bins).sub_(0.5)
    return frac.view_as(r)


def noisy_quant(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, kind: str = "empirical") -> torch.Tensor:
    """clamp(x, q_min·Δ, q_max·Δ) + ε·Δ, ε = 0 where x was clamped (Eq. 8-9 on a [q_min, q_max] grid).

    Gradients: 1 for x inside the range; for a Δ that requires grad, q_min or q_max where x is
    clamped and ε inside (the reference code's noise fake-quantizer)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    with torch.no_grad():
        r, inside = _residuals(x, step, lo, hi)
        eps = _sample_hist(r, inside, 256) if kind == "empirical" else torch.rand_like(x).sub_(0.5)
        eps = eps.mul_(inside)
    return torch.clamp(x, lo * step, hi * step) + eps * step


def noisy_weight(w: torch.Tensor, step: torch.Tensor, bits: int, kind: str = "empirical") -> torch.Tensor:
    """:func:`noisy_quant` on the signed ``bits``-bit weight grid."""
    return noisy_quant(w, step, *qrange(bits, True), kind)
