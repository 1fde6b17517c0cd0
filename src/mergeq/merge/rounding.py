"""Rounding policies for merging quantized experts (HDRQ paper Sec. 4.3).

For experts with integer codes I_k and per-channel steps Δ_k, the merged layer uses the
mean step Δ = Σ α_k Δ_k and integer codes from one of:
- ``float`` (Eq. 11): I = round(Σ α_k I_k Δ_k / Σ α_k Δ_k), the float-domain merge.
- ``nearest``: integer mid-point I = round(Σ α_k I_k), ties (.5) resolved by ``torch.round``'s
  round-half-to-even rule.
Codes are clamped to the experts' signed range. Biases and activation steps are averaged.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..quant import qrange
from ..registry import Registry

ROUNDINGS: Registry = Registry("merge rounding policy")


@ROUNDINGS.register("float")
def float_rounding(codes, steps, alphas, bits):
    num = sum(a * i * s for a, i, s in zip(alphas, codes, steps))
    den = sum(a * s for a, s in zip(alphas, steps))
    return torch.round(num / den)


@ROUNDINGS.register("nearest")
def nearest_rounding(codes, steps, alphas, bits):
    return torch.round(sum(a * i for a, i in zip(alphas, codes)))


@torch.no_grad()
def merge_quant_layers(
    merged: nn.Module,
    layers: dict[str, Sequence[nn.Module]],
    alphas: Sequence[float],
    rounding: str = "float",
    **options,
) -> None:
    """Set every QuantModule of ``merged`` from its experts' layers with the rounding policy."""
    policy: Callable = ROUNDINGS.get(rounding)
    for name, experts in layers.items():
        target = merged.get_submodule(name)
        codes = [m.int_weight() for m in experts]
        steps = [m.w_step for m in experts]
        step = sum(a * s for a, s in zip(alphas, steps))
        lo, hi = qrange(target.w_bits, True)
        ints = torch.clamp(policy(codes, steps, alphas, target.w_bits, **options), lo, hi)
        target.w_step.copy_(step)
        target.weight.copy_(ints * step)
