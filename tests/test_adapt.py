"""Source training and SHOT: head frozen, input untouched, seeded determinism, loss pieces."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergeq.adapt import (ShotConfig, SourceConfig, augment, centroid_pseudo_labels,
                          information_maximization, shot, train_source)
from mergeq.models import get_classifier, resnet8


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), 0, 2 * y, 2 * y] += 4.0  # a class-dependent bright pixel
    return TensorDataset(x, y)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    return train_source(resnet8(width=8), _toy(), SourceConfig(steps=4, batch_size=16), seed=0)


def test_train_source_copies_and_is_deterministic():
    torch.manual_seed(0)
    init = resnet8(width=8)
    before = _state(init)
    cfg = SourceConfig(steps=4, batch_size=16, noise=0.1)
    a = train_source(init, _toy(), cfg, seed=1)
    b = train_source(init, _toy(), cfg, seed=1)
    assert _equal(_state(init), before)
    assert _equal(_state(a), _state(b))
    assert not _equal(_state(a), before) and not a.training
    c = train_source(init, _toy(), cfg, seed=2)
    assert not _equal(_state(a), _state(c))


def test_shot_freezes_head_and_leaves_input_untouched(source_model):
    before = _state(source_model)
    expert = shot(source_model, _toy(48, seed=5), ShotConfig(steps=6, batch_size=16), seed=0)
    assert _equal(_state(source_model), before)
    head, src_head = get_classifier(expert), get_classifier(source_model)
    assert torch.equal(head.weight, src_head.weight) and torch.equal(head.bias, src_head.bias)
    assert not torch.equal(expert.conv1.weight, source_model.conv1.weight)
    assert all(p.requires_grad for p in expert.parameters()) and not expert.training


def test_shot_is_bit_deterministic(source_model):
    cfg = ShotConfig(steps=6, batch_size=16)
    data = _toy(48, seed=5)
    a, b = shot(source_model, data, cfg, seed=3), shot(source_model, data, cfg, seed=3)
    assert _equal(_state(a), _state(b))
    c = shot(source_model, data, cfg, seed=4)
    assert not _equal(_state(a), _state(c))


def test_shot_works_on_a_generic_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    expert = shot(model, _toy(32), ShotConfig(steps=2, batch_size=16), seed=0)
    assert torch.equal(expert[5].weight, model[5].weight)
    assert not torch.equal(expert[0].weight, model[0].weight)
    assert not torch.equal(expert[1].running_mean, model[1].running_mean)


class _Lazy(torch.utils.data.Dataset):
    """A non-tensor Dataset over the same items (what lazy image folders look like to mergeq)."""

    def __init__(self, ds, labels=True):
        self.ds, self.labels = ds, labels

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return (x.clone(), int(y)) if self.labels else x.clone()


def test_lazy_datasets_train_bit_identically_to_tensor_datasets(source_model):
    data, cfg = _toy(48, seed=5), SourceConfig(steps=3, batch_size=16, noise=0.1)
    torch.manual_seed(0)
    init = resnet8(width=8)
    assert _equal(_state(train_source(init, data, cfg, seed=1)), _state(train_source(init, _Lazy(data), cfg, seed=1)))
    scfg = ShotConfig(steps=3, batch_size=16)
    tensor_expert = _state(shot(source_model, data, scfg, seed=3))
    assert _equal(tensor_expert, _state(shot(source_model, _Lazy(data), scfg, seed=3)))
    assert _equal(tensor_expert, _state(shot(source_model, _Lazy(data, labels=False), scfg, seed=3)))
    with pytest.raises(ValueError, match="labeled"):
        train_source(init, _Lazy(data, labels=False), cfg)
    from mergeq.adapt.tta import Tent, run_stream

    streams = [[("a", data), ("b", _toy(20, seed=6))], [("a", _Lazy(data)), ("b", _Lazy(_toy(20, seed=6)))]]
    a, b = (run_stream(Tent(source_model), s, batch_size=16) for s in streams)
    assert a == b and a["n"] == {"a": 48, "b": 20}
    with pytest.raises(ValueError, match="no labels"):
        run_stream(Tent(source_model), [("a", _Lazy(data, labels=False))], batch_size=16)
    with pytest.raises(ValueError, match="non-empty"):
        shot(source_model, TensorDataset(torch.zeros(0, 3, 32, 32)), scfg)


def test_information_maximization_values():
    # confident and balanced: entropy 0, diversity log K -> -log K
    logits = torch.eye(4) * 50
    assert information_maximization(logits, eps=0).item() == pytest.approx(-math.log(4), abs=1e-5)
    # uniform predictions: entropy log K, diversity log K -> 0
    assert information_maximization(torch.zeros(8, 4), eps=0).item() == pytest.approx(0.0, abs=1e-6)
    # confident but collapsed onto one class: entropy 0, diversity 0 -> 0
    collapsed = torch.zeros(6, 4)
    collapsed[:, 2] = 50
    assert information_maximization(collapsed, eps=0).item() == pytest.approx(0.0, abs=1e-5)


def test_centroid_pseudo_labels_fix_wrong_predictions():
    # two well-separated feature clusters; the classifier mislabels one point of each
    feats = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(5, 1)])
    feats = feats + 0.05 * torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    probs = torch.full((10, 2), 0.2)
    probs[:5, 0] = 0.8
    probs[5:, 1] = 0.8
    probs[0], probs[9] = torch.tensor([0.3, 0.7]), torch.tensor([0.7, 0.3])
    assert centroid_pseudo_labels(feats, probs).tolist() == [0] * 5 + [1] * 5


def test_augment_keeps_shape_and_is_seeded():
    x = torch.randn(8, 3, 32, 32)
    cfg = SourceConfig(noise=0.1)
    a = augment(x, cfg, torch.Generator().manual_seed(0))
    b = augment(x, cfg, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)

