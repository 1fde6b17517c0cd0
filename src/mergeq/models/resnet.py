"""CIFAR-style ResNets with BatchNorm for small CPU experiments.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2:
a 3x3 conv-bn-relu stem, three stages of BasicBlocks with widths (w, 2w, 4w) and
strides (1, 2, 2), global average pooling and a final ``Linear`` named ``fc``.
ResNet-(6n+2) has n blocks per stage: resnet8 (n=1), resnet20 (n=3).
Down-sampling shortcuts are 1x1 conv + BN ("option B"), so every BN follows a conv
and can be folded into it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with an identity (or 1x1 conv-bn) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, ``layer1..3`` of BasicBlocks, avg pool, ``fc``."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: int = 16,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        chans = [width, 2 * width, 4 * width]
        layers, in_ch = [], width
        for i, (ch, stride) in enumerate(zip(chans, (1, 2, 2))):
            blocks = [BasicBlock(in_ch if j == 0 else ch, ch, stride if j == 0 else 1)
                      for j in range(blocks_per_stage)]
            layers.append(nn.Sequential(*blocks))
            in_ch = ch
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(chans[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (the input of ``fc``)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet8(num_classes: int = 10, width: int = 16, **kw) -> ResNet:
    """ResNet-8: one BasicBlock per stage (~78k parameters at width 16)."""
    return ResNet(1, num_classes, width, **kw)


def resnet20(num_classes: int = 10, width: int = 16, **kw) -> ResNet:
    """ResNet-20: three BasicBlocks per stage (~0.27M parameters at width 16)."""
    return ResNet(3, num_classes, width, **kw)
