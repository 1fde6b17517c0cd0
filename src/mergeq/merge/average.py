"""Weight averaging of experts (model soups / mid-point merging, Li et al., 2024).

Full-precision tensors: θ = Σ_k α_k θ_k (α_k = 1/N unless weights are given).
BatchNorm statistics, when BN is not folded, merge as a mixture of the experts' feature
distributions: μ = Σ α_k μ_k, σ² = Σ α_k (σ_k² + μ_k²) - μ² (clamped at 0 against float cancellation). Integer buffers
(``num_batches_tracked``) are taken from the first model unchanged. Quantized layers are merged
by a rounding policy (``merge.rounding``) that keeps the result on a grid.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..nn.qmodule import QuantModule
from ..registry import MERGE_METHODS
from .checks import check_mergeable
from .rounding import merge_quant_layers


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def average_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, with mixture statistics for BatchNorm running mean/var."""
    alphas = _weights(len(state_dicts), weights)
    out: dict[str, torch.Tensor] = {}
    for key, ref in state_dicts[0].items():
        ts = [sd[key] for sd in state_dicts]
        if not torch.is_floating_point(ref):
            out[key] = ref.clone()  # integer buffers such as num_batches_tracked
        elif key.endswith("running_var"):
            mkey = key[: -len("running_var")] + "running_mean"
            means = [sd[mkey] for sd in state_dicts]
            mu = sum(a * m for a, m in zip(alphas, means))
            out[key] = (sum(a * (v + m**2) for a, v, m in zip(alphas, ts, means)) - mu**2).clamp_min(0)
        else:
            out[key] = sum(a * t for a, t in zip(alphas, ts))
    return out


@MERGE_METHODS.register("average")
def average(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
    rounding: str = "float",
    **rounding_options,
) -> nn.Module:
    """Average the experts. Quantized layers stay quantized, merged with ``rounding``."""
    check_mergeable(models)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], weights))
    qnames = [n for n, m in merged.named_modules() if isinstance(m, QuantModule)]
    if qnames:
        layers = {n: [m.get_submodule(n) for m in models] for n in qnames}
        merge_quant_layers(merged, layers, _weights(len(models), weights), rounding, **rounding_options)
    return merged
