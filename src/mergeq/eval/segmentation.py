"""Semantic segmentation scores as mmsegmentation 0.x computes them (``mmseg/core/evaluation/metrics.py``,
``intersect_and_union`` / ``total_intersect_and_union`` / ``mean_iou``; the version HRDA and HDRQ build on).

Per image, pixels whose label is ``ignore_index`` are dropped; of the rest, three class histograms
are taken: of the prediction where it equals the label (intersection), of the prediction, and of
the label. Predictions outside ``[0, C)`` fall in no bin (mmseg's ``torch.histc(min=0,
max=C-1)`` drops them): such a pixel counts as a miss of its label's class. The histograms are
summed over the whole data set in float64; union = pred + label - intersection; IoU_c = I_c / U_c,
NaN where U_c = 0 (a class neither present nor predicted) and left out of the mean (``nanmean``); a
class predicted where it never occurs has U_c > 0 and IoU 0. mIoU is therefore the IoU of the
data set's pooled pixels, not the mean of per-image IoUs. Pixel accuracy = Σ I_c / Σ label_c
(mmseg's ``aAcc``). All scores are fractions in [0, 1], as ``metrics.harmonic_mean`` expects.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..data_utils import take
from ..nn.output import select_logits

IGNORE_INDEX = 255


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(area_intersect, area_union, area_pred, area_label)`` of one prediction / label pair
    (any equal shapes, integer class ids): float64 tensors of shape ``[num_classes]``.

    Raises ValueError on shapes that differ, non-integer inputs, or a label outside
    ``[0, num_classes)`` other than ``ignore_index``.
    """
    num_classes = _check_classes(num_classes)
    pred, label = torch.as_tensor(pred), torch.as_tensor(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    for name, t in (("prediction", pred), ("label", label)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    valid = label != ignore_index
    label, pred = label[valid].long().cpu(), pred[valid].long().cpu()
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        raise ValueError(f"labels must be class ids in [0, {num_classes}) or the ignore index {ignore_index}, "
                         f"found {label[bad].unique()[:8].tolist()}")
    known = (pred >= 0) & (pred < num_classes)

    def hist(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(values, minlength=num_classes).to(torch.float64)

    area_intersect = hist(pred[known & (pred == label)])
    area_pred, area_label = hist(pred[known]), hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def iou_from_areas(area_intersect: torch.Tensor, area_union: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = intersection / union (float64), NaN where the union is 0."""
    if area_intersect.shape != area_union.shape:
        raise ValueError(f"intersection shape {tuple(area_intersect.shape)} differs from union shape "
                         f"{tuple(area_union.shape)}")
    inter, union = area_intersect.to(torch.float64), area_union.to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, math.nan))


def scores_from_areas(area_intersect: torch.Tensor, area_union: torch.Tensor, area_label: torch.Tensor) -> dict:
    """``{"miou", "iou", "pixel_acc", "pixels"}`` from data-set totals (see the module docstring);
    ``iou`` is a list of floats with ``None`` for a NaN class. Raises if no pixel is labelled."""
    pixels = float(area_label.sum())
    if pixels == 0:
        raise ValueError("mIoU is undefined: no labelled pixel (every label is the ignore index, or no data)")
    iou = iou_from_areas(area_intersect, area_union)
    return {"miou": float(torch.nanmean(iou)), "iou": [None if math.isnan(v) else v for v in iou.tolist()],
            "pixel_acc": float(area_intersect.sum()) / pixels, "pixels": int(pixels)}


def _batches(data: Dataset | DataLoader, batch_size: int):
    """``(images, labels)`` batches of a DataLoader or a map-style dataset, in order."""
    if isinstance(data, DataLoader):
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("mean_iou needs batches of (images, labels)")
            yield batch[0], batch[1]
        return
    for i in range(0, len(data), batch_size):
        x, y = take(data, range(i, min(i + batch_size, len(data))))
        if y is None:
            raise ValueError("mean_iou needs a labelled dataset of (image, label map) items")
        yield x, y


@torch.no_grad()
def mean_iou(model: nn.Module, data: Dataset | DataLoader, num_classes: int, batch_size: int = 16,
             device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX) -> dict:
    """mIoU of ``model`` on ``data`` (``(image [3,H,W], label [H,W])`` items, or a DataLoader of them),
    accumulated over the whole data set as mmseg does: see :func:`scores_from_areas` for the keys.

    The model runs in eval mode; logits ``[N, C, h, w]`` whose size differs from the label's are
    upsampled bilinearly (``align_corners=False``, as mmseg's ``resize``) before the argmax.
    """
    num_classes = _check_classes(num_classes)
    totals = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(3)]
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(data, batch_size):
            y = torch.as_tensor(y)
            logits = select_logits(model(x.to(device)))
            if logits.dim() != 4 or logits.shape[1] != num_classes or y.dim() != 3 or len(y) != len(logits):
                raise ValueError(f"expected logits [N, {num_classes}, H, W] and labels [N, H, W], got logits "
                                 f"{tuple(logits.shape)} and labels {tuple(y.shape)}")
            if logits.shape[-2:] != y.shape[-2:]:
                logits = F.interpolate(logits, size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
            inter, union, _, area_label = intersect_and_union(logits.argmax(dim=1).cpu(), y, num_classes,
                                                              ignore_index)
            for total, area in zip(totals, (inter, union, area_label)):
                total += area
    finally:
        model.train(was_training)
    return scores_from_areas(*totals)
