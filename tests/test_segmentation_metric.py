"""mIoU as mmsegmentation 0.x computes it: hand-computed cases, a numpy confusion-matrix reference, the model loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mergeq.eval.metrics import harmonic_mean
from mergeq.eval.segmentation import intersect_and_union, iou_from_areas, mean_iou, scores_from_areas

LABEL = torch.tensor([[0, 0, 1], [1, 255, 2]])
PRED = torch.tensor([[0, 1, 1], [1, 2, 0]])


def test_hand_computed_areas_drop_ignored_pixels():
    inter, union, pred, label = intersect_and_union(PRED, LABEL, 3)
    # the ignored pixel (predicted 2) counts nowhere; class 2's one pixel is predicted 0
    assert inter.dtype == torch.float64 and inter.tolist() == [1, 2, 0]
    assert pred.tolist() == [2, 3, 0] and label.tolist() == [2, 2, 1]
    assert union.tolist() == [3, 3, 1]
    s = scores_from_areas(inter, union, label)
    assert s["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3) and s["pixel_acc"] == pytest.approx(3 / 5) and s["pixels"] == 5


def test_absent_class_is_nan_and_left_out_of_the_mean():
    inter, union, _, label = intersect_and_union(PRED, LABEL, 4)
    assert math.isnan(iou_from_areas(inter, union)[3])
    s = scores_from_areas(inter, union, label)
    assert s["iou"][3] is None and s["miou"] == pytest.approx(1 / 3)


def test_false_positive_only_class_scores_zero_and_counts():
    pred = PRED.clone()
    pred[0, 0] = 3  # class 3 never occurs in the labels
    inter, union, _, label = intersect_and_union(pred, LABEL, 4)
    s = scores_from_areas(inter, union, label)
    assert s["iou"] == pytest.approx([0.0, 2 / 3, 0.0, 0.0])  # class 0: I 0, U 1 + 2 - 0 = 3
    assert s["miou"] == pytest.approx((2 / 3) / 4)


def test_prediction_out_of_range_counts_as_a_miss_and_does_not_crash():
    label = torch.tensor([[0, 1]])
    inter, union, pred, area_label = intersect_and_union(torch.tensor([[5, -1]]), label, 2)
    assert inter.tolist() == [0, 0] and pred.tolist() == [0, 0] and area_label.tolist() == [1, 1]
    assert union.tolist() == [1, 1]


def test_dataset_miou_pools_pixels_unlike_the_mean_of_per_image_miou():
    labels = torch.tensor([[[0, 0], [0, 0]], [[0, 1], [1, 1]]])
    preds = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # per image: A -> class 0 IoU 1 (class 1 NaN) = 1.0; B -> class 0: 0/1, class 1: 3/4 -> 0.375
    per_image = [scores_from_areas(*(a := intersect_and_union(p, y, 2))[:2], a[3])["miou"]
                 for p, y in zip(preds, labels)]
    assert per_image == pytest.approx([1.0, 0.375])
    # pooled: class 0 I 4, U 4 + 5 - 4 = 5 -> 0.8; class 1 I 3, U 4 + 3 - 3 = 4 -> 0.75
    a = intersect_and_union(preds, labels, 2)
    pooled = scores_from_areas(a[0], a[1], a[3])
    assert pooled["iou"] == pytest.approx([0.8, 0.75]) and pooled["miou"] == pytest.approx(0.775)
    assert pooled["miou"] != pytest.approx(np.mean(per_image))


def _reference(pred: np.ndarray, label: np.ndarray, c: int):
    """An independent confusion-matrix mIoU (numpy), pixels pooled, 255 ignored, out-of-range predictions missed."""
    keep = label != 255
    p, y = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    ok = (p >= 0) & (p < c)
    cm = np.bincount(y[ok] * c + p[ok], minlength=c * c).reshape(c, c)
    label_hist = np.bincount(y, minlength=c)
    inter = np.diag(cm)
    union = cm.sum(axis=0) + label_hist - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return iou, inter.sum() / max(label_hist.sum(), 1)


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 6), shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
       data=st.data())
def test_matches_a_numpy_confusion_matrix(c, shape, data):
    present = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))  # some classes absent
    label = data.draw(arrays(np.int64, shape, elements=st.sampled_from([*present, 255])))
    pred = data.draw(arrays(np.int64, shape, elements=st.integers(-1, c)))
    inter, union, _, area_label = intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), c)
    ref_iou, ref_acc = _reference(pred, label, c)
    np.testing.assert_allclose(iou_from_areas(inter, union).numpy(), ref_iou, equal_nan=True)
    if (label != 255).any():
        s = scores_from_areas(inter, union, area_label)
        assert s["miou"] == pytest.approx(float(np.nanmean(ref_iou)))
        assert s["pixel_acc"] == pytest.approx(float(ref_acc))
        assert [v is None for v in s["iou"]] == np.isnan(ref_iou).tolist()


class _Oracle(nn.Module):
    """Logits at half resolution that point at the label stored in channel 0 of the image."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        assert not self.training
        ids = x[:, 0].round().long().clamp(0, self.c - 1)
        logits = F.one_hot(ids, self.c).permute(0, 3, 1, 2).float() * self.scale
        return F.avg_pool2d(logits, 2)  # smaller than the labels: mean_iou must upsample


def test_mean_iou_on_a_tiny_model_matches_the_pooled_areas():
    g = torch.Generator().manual_seed(0)
    c = 3
    labels = torch.randint(0, c, (5, 8, 8), generator=g)
    labels = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :8, :8]  # 2x2 blocks: exact at half size
    images = torch.zeros(5, 3, 8, 8)
    images[:, 0] = labels.float()
    labels[0, 0, :] = 255
    model = _Oracle(c).train()
    res = mean_iou(model, TensorDataset(images, labels), c, batch_size=2)
    assert model.training  # mode restored
    assert res["miou"] == pytest.approx(1.0) and res["pixel_acc"] == pytest.approx(1.0)
    assert res["pixels"] == 5 * 64 - 8
    # a wrong model: compare with the areas of its own (upsampled) predictions
    model.scale.data.fill_(-1.0)
    with torch.no_grad():
        pred = F.interpolate(model.eval()(images), size=(8, 8), mode="bilinear", align_corners=False).argmax(1)
    a = intersect_and_union(pred, labels, c)
    expected = scores_from_areas(a[0], a[1], a[3])
    got = mean_iou(model, DataLoader(TensorDataset(images, labels), batch_size=3), c)
    assert got["miou"] == pytest.approx(expected["miou"]) and got["pixel_acc"] == pytest.approx(expected["pixel_acc"])
    assert got["iou"] == expected["iou"]
    assert 0.0 <= got["miou"] < 1.0
    harmonic_mean([res["miou"], got["miou"]])  # fractions in [0, 1]


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) differs from label shape \(3, 2\)"):
        intersect_and_union(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\) or the ignore index 255, "
                                         r"found \[3, 7\]"):
        intersect_and_union(torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 7, 255]), 3)
    with pytest.raises(ValueError, match="prediction must hold integer class ids"):
        intersect_and_union(torch.zeros(4), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        intersect_and_union(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="no labelled pixel"):
        a = intersect_and_union(torch.zeros(4, dtype=torch.long), torch.full((4,), 255), 3)
        scores_from_areas(a[0], a[1], a[3])
    model = _Oracle(3)
    with pytest.raises(ValueError, match=r"expected logits \[N, 4, H, W\] and labels \[N, H, W\]"):
        mean_iou(model, TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="needs a labelled dataset"):
        mean_iou(model, torch.utils.data.Subset(torch.zeros(2, 3, 4, 4), [0, 1]), 3)
