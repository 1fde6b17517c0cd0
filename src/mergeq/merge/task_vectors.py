"""Task-vector merging of full-precision experts that share a base (source) model.

One generalised method, variants as parameters (as mergekit's generalized task arithmetic):
τ_k = θ_k - θ_0 per floating-point tensor, then
- ``task_arithmetic`` (Ilharco et al., 2023): θ = θ_0 + λ Σ_k τ_k.
- ``ties`` (Yadav et al., 2023, Sec. 3): trim each τ_k to its top-``density`` entries by
  magnitude (per tensor), elect a sign per entry γ = sign(Σ_k τ̂_k) (the sign of the larger
  total mass), average only the entries that agree with γ (disjoint mean), θ = θ_0 + λ τ_m.

Exact rules (each tested):
- Trim count: k = int(density · n) entries of an n-entry tensor, mergekit's count (its
  ``sparsify.magnitude``), at least 1 (mergekit refuses k = 0); exactly k are kept, ties in
  magnitude going to the lower flat index (a stable sort).
- Sign election where Σ_k τ̂_k is exactly 0: γ = 0 by default (the paper's sign(·), so no entry
  agrees and τ_m = 0 there); ``sign_tie="positive"`` gives γ = +1 as mergekit does (its
  ``sum >= 0``), so the positive entries are averaged.
- BatchNorm running statistics merge like any other tensor; fold BatchNorm first (as the HDRQ
  pipeline and ``mergeq pmq`` do) to avoid that. Integer buffers (``num_batches_tracked``) are
  taken from the base unchanged. A merged ``running_var`` with negative entries (Task
  Arithmetic extrapolates past the experts when λ·N > 1) is refused with the tensor named.
Quantized experts are refused: merge them with ``average`` and a rounding policy, or merge in
full precision and quantize the merged model.
"""
from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
from torch import nn

from ..errors import IncompatibleModelsError
from ..nn.qmodule import QuantModule
from ..registry import MERGE_METHODS
from .checks import check_mergeable

SIGN_TIES = ("zero", "positive")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density · n)) entries of largest |τ| (ties: lower index first)."""
    if density >= 1.0:
        return tau
    k = max(1, int(density * tau.numel()))
    keep = torch.argsort(tau.abs().flatten(), descending=True, stable=True)[:k]
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[keep] = True
    return torch.where(mask.view_as(tau), tau, torch.zeros_like(tau))


def disjoint_mean(taus: Sequence[torch.Tensor], sign_tie: str = "zero") -> torch.Tensor:
    """TIES sign election and disjoint mean of already trimmed task vectors; ``sign_tie`` is the
    sign elected where the entries sum to exactly 0 (``zero``: none agrees; ``positive``: +1)."""
    if sign_tie not in SIGN_TIES:
        raise ValueError(f"sign_tie must be one of {SIGN_TIES}, got {sign_tie!r}")
    stacked = torch.stack(list(taus))
    total = stacked.sum(dim=0)
    sign = torch.sign(total) if sign_tie == "zero" else torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return (stacked * agree).sum(dim=0) / count


def task_vector_merge(
    base: dict[str, torch.Tensor],
    experts: Sequence[dict[str, torch.Tensor]],
    scale: float = 1.0,
    density: float = 1.0,
    consensus: str | None = None,
    sign_tie: str = "zero",
) -> dict[str, torch.Tensor]:
    """Pure function on state dicts: θ_0 + λ · combine(trim(θ_k - θ_0)); integer buffers from
    the base; a negative merged ``running_var`` raises :class:`IncompatibleModelsError`."""
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
        combined = disjoint_mean(taus, sign_tie) if consensus == "sign" else sum(taus)
        out[key] = t0 + scale * combined
        if key.endswith("running_var") and (out[key] < 0).any():
            raise IncompatibleModelsError(
                f"the merge gives {key} {int((out[key] < 0).sum())} negative variance entries (scale {scale} "
                f"with {len(experts)} experts extrapolates past them): fold BatchNorm first "
                "(mergeq.nn.fold_bn, as the pipeline does) or use a smaller scale")
    return out


def _merge(models: Sequence[nn.Module], base: nn.Module | None, method: str, **kw) -> nn.Module:
    if base is None:
        raise ValueError(f"{method} needs the shared base (source) model: pass base=source_model")
    quantized = [name for name, model in (*((f"model {k}", m) for k, m in enumerate(models)), ("the base", base))
                 if any(isinstance(m, QuantModule) for m in model.modules())]
    if quantized:
        raise IncompatibleModelsError(
            f"{method} needs full-precision experts and base; quantized: {', '.join(quantized)}. Merge quantized "
            "experts with method='average' and a rounding policy, or quantize the merged model afterwards")
    check_mergeable(models)
    check_mergeable([models[0], base], ["model 0", "the base"])
    merged = copy.deepcopy(base)
    merged.load_state_dict(task_vector_merge(base.state_dict(), [m.state_dict() for m in models], **kw))
    return merged


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic(models: Sequence[nn.Module], base: nn.Module | None = None, scale: float = 0.3) -> nn.Module:
    """θ_0 + λ Σ_k (θ_k - θ_0); λ = ``scale`` (0.3 is the usual choice for a few tasks)."""
    return _merge(models, base, "task_arithmetic", scale=scale)


@MERGE_METHODS.register("ties")
def ties(models: Sequence[nn.Module], base: nn.Module | None = None, density: float = 0.2,
         scale: float = 1.0, sign_tie: Literal["zero", "positive"] = "zero") -> nn.Module:
    """TIES-merging: trim to ``density``, elect signs (``sign_tie`` where the sum is 0),
    disjoint mean, θ_0 + λ τ_m."""
    return _merge(models, base, "ties", scale=scale, density=density, consensus="sign", sign_tie=sign_tie)
