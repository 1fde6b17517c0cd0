"""The score of a model per domain and the harmonic mean over target domains (HDRQ paper, Tables 1-2).

A domain's score follows from its labels: top-1 accuracy for image labels (``N``), mIoU for
per-pixel labels (``N x H x W``; :func:`mergeq.eval.segmentation.mean_iou`, mmsegmentation's
data-set mIoU). Both are fractions in [0, 1], so the harmonic mean ``hmean`` (the paper's H)
is the same formula for both tasks."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


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


def is_dense(data: Dataset | DataLoader) -> bool:
    """Whether ``data`` holds per-pixel labels (segmentation): its first label has two dimensions."""
    if isinstance(data, TensorDataset):
        return len(data.tensors) > 1 and data.tensors[1].dim() == 3
    if isinstance(data, DataLoader):
        data = data.dataset
    if len(data) == 0:
        return False
    item = data[0]
    return isinstance(item, (tuple, list)) and len(item) > 1 and torch.as_tensor(item[1]).dim() == 2


def score(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256,
          device: str | torch.device = "cpu") -> float:
    """The model's score on a labelled domain: mIoU for per-pixel labels, else top-1 accuracy."""
    if is_dense(data):
        from .segmentation import mean_iou

        return mean_iou(model, data, _classes(model, data, device), min(batch_size, 32), device)["miou"]
    return accuracy(model, data, batch_size, device)


@torch.no_grad()
def _classes(model: nn.Module, data: Dataset | DataLoader, device) -> int:
    """The number of classes a segmentation model predicts: the channels of its output."""
    from ..data_utils import take

    x = take(data.dataset if isinstance(data, DataLoader) else data, [0])[0]
    was_training = model.training
    out = model.eval()(x.to(device))
    model.train(was_training)
    return out.shape[1]


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
    """The score (:func:`score`) on every domain plus ``hmean``, the harmonic mean over them; for
    per-pixel labels also ``iou``: per domain, every class's IoU (None: the class is absent there)."""
    if not any(is_dense(data) for data in domains.values()):
        accs = {name: accuracy(model, data, batch_size, device) for name, data in domains.items()}
        return {**accs, "hmean": harmonic_mean(accs)}
    from .segmentation import mean_iou

    found = {name: mean_iou(model, data, _classes(model, data, device), min(batch_size, 32), device)
             for name, data in domains.items()}
    scores = {name: r["miou"] for name, r in found.items()}
    return {**scores, "hmean": harmonic_mean(scores), "iou": {name: r["iou"] for name, r in found.items()}}
