"""Loss landscapes: the linear path between two experts and the error barrier (HDRQ paper
Eq. 1-3), and 2-D loss surfaces along filter-normalised random directions (Fig. 2).

Path (Eq. 1): θ_λ = (1 - λ) θ_1 + λ θ_2 on a grid of λ. For quantized experts θ_λ is the
λ-weighted merge of the two experts on the interpolated grid (``merge(..., weights=[1-λ, λ])``,
float rounding, Eq. 11), i.e. quantization applied to θ_λ as in Eq. 3.
Error barrier (Eq. 2 / Eq. 3): max_λ L(θ_λ) - (L(θ_1) + L(θ_2)) / 2, where L is the mean
cross-entropy over the given domains (each domain weighted equally). The accuracy barrier is
the same with the accuracy drop, (A(θ_1) + A(θ_2)) / 2 - min_λ A(θ_λ).

Surface: L(θ + α d_1 + β d_2) with d_i Gaussian directions rescaled filter by filter to the
norm of the matching filter of θ (Li et al., 2018, "Visualizing the loss landscape of neural
nets"). For a quantized model the perturbation is added to its on-grid weights and weight
re-rounding is switched off (activations stay quantized), showing the curvature the weights
sit in rather than a staircase.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..merge import merge
from ..nn.qmodule import quant_modules, set_quant_state


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, domains: Mapping[str, Dataset], device: str | torch.device = "cpu",
                      batch_size: int = 256) -> tuple[float, float]:
    """Mean over domains of the cross-entropy and of the accuracy."""
    model.eval()
    losses, accs = [], []
    for data in domains.values():
        total_loss, correct, n = 0.0, 0, 0
        for x, y in DataLoader(data, batch_size=batch_size):
            logits = model(x.to(device)).cpu()
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        losses.append(total_loss / n)
        accs.append(correct / n)
    return sum(losses) / len(losses), sum(accs) / len(accs)


def error_barrier(values: Sequence[float]) -> float:
    """Eq. 2: max_λ v(λ) - (v(0) + v(1)) / 2 for values on a λ grid from 0 to 1."""
    if len(values) < 2:
        raise ValueError("an error barrier needs values at λ = 0 and λ = 1 at least")
    return max(values) - (values[0] + values[-1]) / 2


def _check_points(points: int) -> None:
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer of at least 2 (both ends of the grid), got {points!r}")


def linear_path(m1: nn.Module, m2: nn.Module, domains: Mapping[str, Dataset], points: int = 11,
                device: str | torch.device = "cpu") -> dict:
    """Loss and accuracy along θ_λ, with the loss barrier and the accuracy barrier."""
    _check_points(points)
    lambdas = [i / (points - 1) for i in range(points)]
    losses, accs = [], []
    for lam in lambdas:
        model = m1 if lam == 0 else m2 if lam == 1 else merge([m1, m2], weights=[1 - lam, lam])
        loss, acc = loss_and_accuracy(model, domains, device)
        losses.append(loss)
        accs.append(acc)
    return {"lambda": lambdas, "loss": losses, "accuracy": accs, "loss_barrier": error_barrier(losses),
            "accuracy_barrier": error_barrier([-a for a in accs])}


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors of every Conv2d/Linear (wrapped or not): what a direction perturbs."""
    qms = quant_modules(model)
    if qms:
        return [m.weight for _, m in qms]
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def filter_normalized_direction(model: nn.Module, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for w in _weights(model):
        d = torch.randn(w.shape, generator=g).to(w.device)
        dims = tuple(range(1, w.dim()))
        scale = torch.linalg.vector_norm(w.detach(), dim=dims, keepdim=True) / torch.linalg.vector_norm(
            d, dim=dims, keepdim=True).clamp_min(1e-12)
        out.append(d * scale)
    return out


@torch.no_grad()
def loss_surface(model: nn.Module, domains: Mapping[str, Dataset], points: int = 11, radius: float = 1.0,
                 seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Loss on a points x points grid of (α, β) in [-radius, radius]² around ``model``."""
    _check_points(points)
    g = torch.Generator().manual_seed(seed)
    d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
    weights = _weights(model)
    base = [w.detach().clone() for w in weights]
    coords = [radius * (2 * i / (points - 1) - 1) for i in range(points)]
    quantized = bool(quant_modules(model))
    if quantized:
        set_quant_state(model, weight=False, act=True)
    grid = []
    try:
        for a in coords:
            row = []
            for b in coords:
                for w, w0, u, v in zip(weights, base, d1, d2):
                    w.copy_(w0 + a * u + b * v)
                row.append(loss_and_accuracy(model, domains, device)[0])
            grid.append(row)
    finally:
        for w, w0 in zip(weights, base):
            w.copy_(w0)
        if quantized:
            set_quant_state(model, weight=True, act=True)
    return {"alpha": coords, "beta": coords, "loss": grid}
