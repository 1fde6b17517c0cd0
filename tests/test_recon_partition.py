"""The model -> reconstruction-units rule (nn.blocks.partition) on several architectures."""
import torch
from torch import nn
from torch.nn import functional as F

from mergeq.nn import QuantModule, prepare
from mergeq.nn.blocks import is_block, is_container, partition
from mergeq.quant.config import QuantConfig

from .conftest import Basic, Nested, tiny_resnet, vgg_stack


class TVBottleneck(nn.Module):
    """torchvision-style Bottleneck: conv1..3/bn1..3 attributes and a ``downsample`` Sequential."""

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != 4 * c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(TVBottleneck(8, 4), TVBottleneck(16, 4))
        self.layer2 = nn.Sequential(TVBottleneck(16, 8, 2))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Wrapper(nn.Module):
    """A whole network inside a custom module (not a block: it nests blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = TVResNet()

    def forward(self, x):
        return F.log_softmax(self.backbone(x), dim=1)


def names(model, **kw):
    return [n for n, _ in partition(model, **kw)]


def test_cifar_resnet_like():
    assert names(tiny_resnet()) == ["0", "3", "4", "7"]


def test_vgg_stack_is_layerwise():
    assert names(vgg_stack()) == ["0", "4", "9", "12"]


def test_torchvision_bottleneck_resnet_and_wrapper():
    expect = ["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"]
    assert names(TVResNet()) == expect
    assert names(Wrapper()) == [f"backbone.{n}" for n in expect]


def test_nested_containers():
    assert names(Nested()) == ["stem.0", "stages.a.0", "stages.b.0.0", "head"]


def test_on_quantized_model_in_execution_order():
    torch.manual_seed(0)
    q = prepare(TVResNet(), QuantConfig(a_bits=None))
    units = partition(q)
    assert [n for n, _ in units] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"]
    assert isinstance(units[0][1], QuantModule) and isinstance(units[-1][1], QuantModule)
    covered = [m for _, u in units for m in u.modules() if isinstance(m, QuantModule)]
    assert len(covered) == len({id(m) for m in covered}) == 13  # every layer in exactly one unit

    class Reordered(nn.Module):  # registration order differs from execution order
        def __init__(self):
            super().__init__()
            self.head, self.body = nn.Linear(8, 2), Basic(3, 8)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    m = Reordered()
    assert names(m) == ["head", "body"]
    assert names(m, example_input=torch.randn(1, 3, 8, 8)) == ["body", "head"]


def test_layerwise_and_helpers():
    assert names(tiny_resnet(), layerwise=True) == ["0", "3.conv1", "3.conv2", "4.conv1", "4.conv2", "4.down.0", "7"]
    assert is_container(nn.Sequential()) and is_container(nn.ModuleList())
    assert is_block(Basic(3, 8)) and not is_block(TVResNet()) and not is_block(nn.Conv2d(1, 1, 1))
