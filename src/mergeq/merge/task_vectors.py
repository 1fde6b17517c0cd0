"""Task-vector merging of full-precision experts that share a base (source) model.

One generalised method, variants as parameters (as mergekit's generalized task arithmetic):
τ_k = θ_k - θ_0 per floating-point tensor, then
- ``task_arithmetic`` (Ilharco et al., 2023): θ = θ_0 + λ Σ_k τ_k.
- ``ties`` (Yadav et al., 2023, Sec. 3): trim each τ_k to its top-``density`` fraction of
  entries by magnitude (per tensor, as mergekit does), elect a sign per entry
  γ = sign(Σ_k τ̂_k) (the sign of the larger total mass), average only the entries that agree
  with γ (disjoint mean), θ = θ_0 + λ τ_m.
BatchNorm running statistics are merged like any other tensor; fold BatchNorm first (as the
HDRQ pipeline does) to avoid that. Quantized experts are refused: merge them with ``average``
and a rounding policy, or merge in full precision and quantize the merged model.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..errors import IncompatibleModelsError
from ..nn.qmodule import QuantModule
from ..registry import MERGE_METHODS
from .checks import check_mergeable


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |τ| (ties at the threshold kept)."""
    if density >= 1.0:
        return tau
    k = max(1, int(round(density * tau.numel())))
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def disjoint_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election and disjoint mean of already trimmed task vectors."""
    stacked = torch.stack(list(taus))
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return (stacked * agree).sum(dim=0) / count


def task_vector_merge(
    base: dict[str, torch.Tensor],
    experts: Sequence[dict[str, torch.Tensor]],
    scale: float = 1.0,
    density: float = 1.0,
    consensus: str | None = None,
) -> dict[str, torch.Tensor]:
    """Pure function on state dicts: θ_0 + λ · combine(trim(θ_k - θ_0))."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if consensus not in (None, "sign"):
        raise ValueError(f"consensus must be None or 'sign', got {consensus!r}")
    out = {}
    for key, t0 in base.items():
        if not torch.is_floating_point(t0):
            out[key] = t0.clone()
            continue
        taus = [trim(sd[key] - t0, density) for sd in experts]
        combined = disjoint_mean(taus) if consensus == "sign" else sum(taus)
        out[key] = t0 + scale * combined
    return out


def _merge(models: Sequence[nn.Module], base: nn.Module | None, method: str, **kw) -> nn.Module:
    if base is None:
        raise ValueError(f"{method} needs the shared base (source) model: pass base=source_model")
    check_mergeable([base, *models])
    if any(isinstance(m, QuantModule) for model in models for m in model.modules()):
        raise IncompatibleModelsError(
            f"{method} merges full-precision experts; merge quantized experts with method='average' "
            "and a rounding policy, or quantize the merged model afterwards"
        )
    merged = copy.deepcopy(base)
    merged.load_state_dict(task_vector_merge(base.state_dict(), [m.state_dict() for m in models], **kw))
    return merged


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic(models: Sequence[nn.Module], base: nn.Module | None = None, scale: float = 0.3) -> nn.Module:
    """θ_0 + λ Σ_k (θ_k - θ_0); λ = ``scale`` (0.3 is the usual choice for a few tasks)."""
    return _merge(models, base, "task_arithmetic", scale=scale)


@MERGE_METHODS.register("ties")
def ties(models: Sequence[nn.Module], base: nn.Module | None = None, density: float = 0.2,
         scale: float = 1.0) -> nn.Module:
    """TIES-merging: trim to ``density``, elect signs, disjoint mean, θ_0 + λ τ_m."""
    return _merge(models, base, "ties", scale=scale, density=density, consensus="sign")
