"""Uniform quantization on a grid of step Δ.

    q = clamp(round(w / Δ), q_min, q_max),   ŵ = q · Δ

Signed grids use [-2^(b-1), 2^(b-1) - 1] (weights), unsigned [0, 2^b - 1] (activations
after ReLU). Weights get one Δ per output channel, chosen by searching clipping ratios
(BRECQ/QDrop initialisation): Δ(r) = r · max|w_c| / q_max for r on a grid, keeping the r
that minimises the l_p norm of w_c - ŵ_c (p = 2 is the MSE search; BRECQ/QDrop use p = 2.4).
``absmax`` is r = 1. Rounding uses ``torch.round`` (half to even).
"""
from __future__ import annotations

import torch

from ..errors import BitWidthError
from .fakequant import ste_fake_quant

MIN_BITS, MAX_BITS = 2, 8
STEP_METHODS = ("mse", "lp", "absmax")


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in [2, 8], else raise :class:`BitWidthError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise BitWidthError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass (STE)."""
    return x + (torch.round(x) - x).detach()


def quantize_int(w: torch.Tensor, step: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Integer codes clamp(round(w/Δ)) as a float tensor holding integers."""
    lo, hi = qrange(bits, signed)
    return torch.clamp(torch.round(w / step), lo, hi)


def fake_quantize(w: torch.Tensor, step: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """clamp(round(w/Δ))·Δ with a straight-through gradient for ``w`` (and LSQ-style for Δ), as
    one fused autograd node (quant.fakequant)."""
    lo, hi = qrange(bits, signed)
    return ste_fake_quant(w, step, lo, hi)


def _channel_view(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1)


def search_weight_step(
    w: torch.Tensor,
    bits: int,
    method: str = "mse",
    p: float = 2.4,
    grid: int = 100,
) -> torch.Tensor:
    """Per-output-channel step Δ shaped ``[C, 1, ...]`` to broadcast against ``w``.

    ``method``: ``mse`` (clip-ratio search minimising squared error), ``lp`` (same with the
    l_p norm, ``p`` = 2.4 as in BRECQ/QDrop) or ``absmax`` (no clipping).
    """
    check_bits(bits, "weight bits")
    if method not in STEP_METHODS:
        raise ValueError(f"weight step method must be one of {STEP_METHODS}, got {method!r}")
    wc = _channel_view(w).float()
    _, hi = qrange(bits, True)
    absmax = wc.abs().amax(dim=1).clamp_min(1e-8)
    best = absmax / hi
    if method != "absmax":
        power = 2.0 if method == "mse" else p
        best_err = torch.full_like(absmax, float("inf"))
        for i in range(grid):
            ratio = 1.0 - i / grid  # 1.00, 0.99, ... 0.01
            step = (absmax * ratio / hi)[:, None]
            err = (quantize_int(wc, step, bits) * step - wc).abs().pow(power).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, step[:, 0], best)
    return best.reshape((-1,) + (1,) * (w.dim() - 1)).to(w.dtype)
