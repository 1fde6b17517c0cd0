"""torchvision's bottleneck ResNet, built here (no torchvision needed), and a counter of its
multiply-accumulates, for ``gpu_check.py``: ResNet-50 (the probe; the same 25,557,032 parameters
and 4,089,184,256 MACs at 224 px as torchvision's ``resnet50``) and the HDRQ reference code's
segmentation backbone, ResNetV1c-101 at output stride 8 (``configs/_base_/models/segformer_r101.py``
there: deep stem, strides 1,2,1,1, dilations 1,1,2,4), with a small 1x1 head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet with bottlenecks (``layers`` 3,4,6,3: ResNet-50; 3,4,23,3: -101);
    ``deep_stem``: ResNetV1c's three 3x3 stem convs; ``strides``/``dilations`` per stage."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000, deep_stem: bool = False,
                 strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1)) -> None:
        super().__init__()
        if deep_stem:
            self.stem = nn.Sequential(*[m for cin, cout, s in ((3, 32, 2), (32, 32, 1), (32, 64, 1)) for m in (
                nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))])
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            planes = 64 * 2 ** i
            stages.append(nn.Sequential(*[Bottleneck(cin if k == 0 else planes * 4, planes, s if k == 0 else 1, d)
                                          for k in range(n)]))
            cin = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x):
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class SegNet(nn.Module):
    """The segmentation setting's model for counting: ResNetV1c-101 at output stride 8 and a 1x1
    projection head to 19 classes (the reference code's head is a few 1x1 convs: a small share)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet((3, 4, 23, 3), deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
        self.head = nn.Sequential(nn.Conv2d(2048, 256, 1), nn.ReLU(inplace=True), nn.Conv2d(256, 19, 1))

    def forward(self, x):
        return self.head(self.backbone.features(x))


def forward_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers in one forward of an input ``shape``,
    counted on the ``meta`` device (no memory, no compute)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            k = m.in_features
        else:
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total += out.numel() * k

    model = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.empty(shape, device="meta"))
    for h in hooks:
        h.remove()
    return total
