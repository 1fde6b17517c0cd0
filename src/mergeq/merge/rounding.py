"""Rounding policies for merging quantized experts (HDRQ paper, Sec. 4.3).

Expert k has, per layer, integer codes I_k and per-channel steps Δ_k; α_k are the merge
weights (1/N by default). The merged layer uses the mean step Δ = Σ α_k Δ_k and codes from:

- ``float`` (Eq. 11): I = round(Σ α_k I_k Δ_k / Σ α_k Δ_k), the float-domain merge.
- ``nearest``: the integer mid-point I = round(Σ α_k I_k) (Li et al., 2024); the ambiguous .5
  cases go to the even integer (``torch.round`` rounds half to even).
- ``noise`` (Eq. 12 + cosine filter) and ``noise-ties`` (the authors' reference code):
  see ``merge.noise``.

A policy sees every quantized layer at once (``LayerStack`` per layer) so that sampling
policies can select whole-model samples. Codes are clamped to the signed b-bit range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..quant import qrange
from ..registry import Registry
from ..typed import check_keys, hints_of

ROUNDINGS: Registry = Registry("merge rounding policy")


@dataclass
class LayerStack:
    """One layer of every expert: codes I_k, steps Δ_k (broadcastable), and the bit width."""

    codes: list[torch.Tensor]
    steps: list[torch.Tensor]
    bits: int

    def weights(self) -> list[torch.Tensor]:
        return [i * s for i, s in zip(self.codes, self.steps)]

    def merged_step(self, alphas: Sequence[float]) -> torch.Tensor:
        return sum(a * s for a, s in zip(alphas, self.steps))

    def clamp(self, codes: torch.Tensor) -> torch.Tensor:
        lo, hi = qrange(self.bits, True)
        return torch.clamp(codes, lo, hi)


def float_codes(layer: LayerStack, alphas: Sequence[float]) -> torch.Tensor:
    """Eq. 11 before rounding: Σ α_k I_k Δ_k / Σ α_k Δ_k."""
    return sum(a * w for a, w in zip(alphas, layer.weights())) / layer.merged_step(alphas)


@ROUNDINGS.register("float")
def float_rounding(layers: list[LayerStack], alphas: Sequence[float]) -> list[torch.Tensor]:
    return [layer.clamp(torch.round(float_codes(layer, alphas))) for layer in layers]


@ROUNDINGS.register("nearest")
def nearest_rounding(layers: list[LayerStack], alphas: Sequence[float]) -> list[torch.Tensor]:
    return [layer.clamp(torch.round(sum(a * i for a, i in zip(alphas, layer.codes)))) for layer in layers]


def check_rounding_options(rounding: str, options: dict, where: str = "merge.rounding_options") -> None:
    """Refuse, before any work, options the policy does not take (``float`` and ``nearest`` take
    none), values of the wrong type and values out of range (mergeq.bounds, e.g. ``samples`` below
    1); each error names the option."""
    policy = ROUNDINGS.get(rounding)
    check_keys(options, hints_of(policy, skip=("layers", "alphas")), f"{where} (rounding {rounding})")


def layer_stacks(layers: dict[str, Sequence[nn.Module]]) -> list[LayerStack]:
    return [
        LayerStack([m.int_weight() for m in experts], [m.w_step for m in experts], experts[0].w_bits)
        for experts in layers.values()
    ]


@torch.no_grad()
def merge_quant_layers(
    merged: nn.Module,
    layers: dict[str, Sequence[nn.Module]],
    alphas: Sequence[float],
    rounding: str = "float",
    **options,
) -> None:
    """Set every QuantModule of ``merged`` from its experts' layers with the rounding policy."""
    check_rounding_options(rounding, options)
    policy: Callable = ROUNDINGS.get(rounding)
    stacks = layer_stacks(layers)
    codes = policy(stacks, alphas, **options)
    for name, stack, ints in zip(layers, stacks, codes):
        target = merged.get_submodule(name)
        step = stack.merged_step(alphas)
        target.w_step.copy_(step)
        target.weight.copy_(ints * step)
