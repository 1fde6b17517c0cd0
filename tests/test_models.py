"""CIFAR-style ResNets: shapes, registry errors, classifier lookup on any nn.Module."""
import pytest
import torch
from torch import nn

from mergeq.models import ARCHITECTURES, build_model, get_classifier, resnet8, resnet20


@pytest.mark.parametrize("arch,blocks", [("resnet8", 1), ("resnet20", 3)])
def test_forward_shapes_and_depth(arch, blocks):
    model = build_model(arch, num_classes=7, width=8).eval()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert all(len(stage) == blocks for stage in (model.layer1, model.layer2, model.layer3))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 6 * blocks + 2  # 6n block convs + stem conv, + fc = depth 6n+2


def test_every_batchnorm_follows_a_conv():
    mods = list(resnet20().modules())
    leaf = [m for m in mods if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for prev, cur in zip(leaf, leaf[1:]):
        if isinstance(cur, nn.BatchNorm2d):
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == cur.num_features


def test_parameter_counts_and_width():
    n8 = sum(p.numel() for p in resnet8().parameters())
    n20 = sum(p.numel() for p in resnet20().parameters())
    assert 70_000 < n8 < 90_000 and 260_000 < n20 < 290_000
    assert resnet8(width=32).fc.in_features == 128


def test_unknown_arch_lists_known():
    with pytest.raises(ValueError, match="known: resnet20, resnet8"):
        build_model("vgg11", 10)
    assert {"resnet8", "resnet20"} <= set(ARCHITECTURES)


def test_get_classifier():
    model = resnet8(num_classes=5)
    assert get_classifier(model) is model.fc
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    assert get_classifier(seq) is seq[2][0]
    with pytest.raises(ValueError, match="no nn.Linear"):
        get_classifier(nn.Sequential(nn.Conv2d(3, 3, 1)))
