"""Accuracy per domain and the harmonic mean over target domains (HDRQ paper, Table 2 metric)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on a labelled dataset."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy on an empty dataset is undefined")
    return correct / total


def harmonic_mean(values: Mapping[str, float] | list[float]) -> float:
    """n / Σ 1/v_i; 0 when any value is 0. Raises on an empty input or a value outside [0, 1]."""
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not vals:
        raise ValueError("harmonic mean of no values is undefined")
    if any(not 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"accuracies must lie in [0, 1], got {vals}")
    if any(v == 0.0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def evaluate(
    model: nn.Module,
    domains: Mapping[str, Dataset | DataLoader],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy on every domain plus ``hmean``, the harmonic mean over them."""
    accs = {name: accuracy(model, data, batch_size, device) for name, data in domains.items()}
    return {**accs, "hmean": harmonic_mean(accs)}
