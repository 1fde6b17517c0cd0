"""DeepLab-style segmentation networks: a dilated ResNet (output stride 8) and a light head.

Backbone: ResNetV1c as HDRQ's reference configures it (ewsn1593/HDRQ,
``configs/_base_/models/segformer_r101.py``): a stem of 3x3 conv-BN-ReLU layers (the first of
stride 2) and a 3x3 max pool of stride 2, then four stages with strides (1, 2, 1, 1) and
dilations (1, 1, 2, 4), so that the stages run at strides (4, 8, 8, 8) of the input (Yu &
Koltun's dilated residual networks; Chen et al., DeepLab, TPAMI 2018, section 3.1). As in
mmseg's ``ResLayer`` with ``contract_dilation=True``, the first block of a dilated stage uses
half the stage's dilation. Down-sampling shortcuts are 1x1 conv + BN, so every BN folds.
``BasicBlock`` dilates both of its 3x3 convs (torchvision's refuses dilation > 1); the
``Bottleneck`` dilates its 3x3 conv (as torchvision and mmseg do).

Heads (``head=``):

* ``"daformer"``: DAFormer's head with HDRQ's settings (lhoyer/DAFormer
  ``mmseg/models/decode_heads/daformer_head.py``; ``embed_cfg`` ``mlp``, ``fusion_cfg`` a 1x1
  ``conv`` + BN + ReLU): every stage's features through a linear embedding (a 1x1 conv with
  bias, which is what the token-wise ``MLP`` computes), resized bilinearly to the first stage's
  size (stride 4), concatenated, fused by 1x1 conv + BN + ReLU, then ``Dropout2d`` and the
  classifier ``conv_seg`` (1x1, bias).
* ``"aspp"``: DeepLabV2's ASPP classifier on the last stage: the sum of four dilated 3x3 convs
  to ``num_classes`` channels, with bias and no BN. The paper's rates (6, 12, 18, 24) are for
  ~41x41 features (321 px crops at stride 8); ``aspp_rates`` defaults to (1, 2, 3, 4), the
  same fractions of the field for the 8x8 features of a 64 px input (rate x 41 / 8, rounded).

The forward returns logits ``[N, C, H, W]`` at the input resolution: the head's logits are
upsampled bilinearly (``align_corners=False``) as the last op, as mmseg's ``EncoderDecoder``.

Module layout for the reconstruction units of :func:`mergeq.nn.blocks.partition` (HDRQ's
reference: each residual block one unit, every other conv alone): ``backbone.stem`` and
``backbone.layerK`` are plain Sequentials (each stem conv and each block a unit); the DAFormer
head is a ``ModuleDict`` whose forward lives in :class:`DeepLab`, so each embedding conv,
``decode_head.fuse.0`` and ``decode_head.conv_seg`` are units of their own; the ASPP is one
module with its own forward, hence one unit.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError

HEADS = ("daformer", "aspp")


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, dilation * (k // 2), dilation, bias=False), nn.BatchNorm2d(c_out)]


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, both dilated by ``dilation`` (the first by ``first_dilation``)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 3, stride, first_dilation or dilation)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, 1, dilation)
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4 (ResNet V1b/V1c: stride on the 3x3)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride, first_dilation or dilation)
        self.conv3, self.bn3 = _conv_bn(planes, planes * 4, 1)
        self.shortcut = _shortcut(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class DilatedResNet(nn.Module):
    """Stem (3x3 conv-BN-ReLU per ``stem_channels``, first of stride 2; 3x3 max pool of stride 2)
    and stages ``layer1..K``; the forward returns every stage's output (a tuple)."""

    def __init__(self, block: type[nn.Module], blocks: Sequence[int], widths: Sequence[int],
                 stem_channels: Sequence[int], strides: Sequence[int] = (1, 2, 1, 1),
                 dilations: Sequence[int] = (1, 1, 2, 4), contract_dilation: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        if not (len(blocks) == len(widths) == len(strides) == len(dilations)) or not blocks or not stem_channels:
            raise ModelError(f"DilatedResNet: blocks, widths, strides and dilations need one entry per stage and "
                             f"stem_channels at least one, got {list(blocks)}, {list(widths)}, {list(strides)}, "
                             f"{list(dilations)}, {list(stem_channels)}")
        stem, c = [], in_channels
        for i, ch in enumerate(stem_channels):
            stem += [*_conv_bn(c, ch, 3, 2 if i == 0 else 1), nn.ReLU()]
            c = ch
        self.stem = nn.Sequential(*stem, nn.MaxPool2d(3, 2, 1))
        self.out_channels: list[int] = []
        self.num_stages = len(blocks)
        self.strides = tuple(int(s) for s in strides)
        for k, (n, planes, stride, dil) in enumerate(zip(blocks, widths, strides, dilations), start=1):
            first = dil // 2 if contract_dilation and dil > 1 else dil
            layers = []
            for j in range(n):
                layers.append(block(c, planes, stride if j == 0 else 1, dil, first if j == 0 else None))
                c = planes * block.expansion
            setattr(self, f"layer{k}", nn.Sequential(*layers))
            self.out_channels.append(c)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        feats = []
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{k}")(x)
            feats.append(x)
        return tuple(feats)


class ASPP(nn.Module):
    """DeepLabV2's classifier: sum over ``rates`` of 3x3 convs with that dilation (bias, no BN)."""

    def __init__(self, c_in: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        if not rates or any(int(r) < 1 for r in rates):
            raise ModelError(f"ASPP rates must be positive integers, got {list(rates)}")
        self.convs = nn.ModuleList(nn.Conv2d(c_in, num_classes, 3, 1, int(r), int(r)) for r in rates)
        for conv in self.convs:  # DeepLabV2: N(0, 0.01) weights
            nn.init.normal_(conv.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


def daformer_head(in_channels: Sequence[int], embed_dim: int, channels: int, num_classes: int,
                  dropout: float) -> nn.ModuleDict:
    """The DAFormer conv head's layers (its forward: :meth:`DeepLab._decode_daformer`)."""
    return nn.ModuleDict({
        "embed": nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels),
        "fuse": nn.Sequential(*_conv_bn(embed_dim * len(in_channels), channels, 1), nn.ReLU()),
        "dropout": nn.Dropout2d(dropout),
        "conv_seg": nn.Conv2d(channels, num_classes, 1),
    })


class DeepLab(nn.Module):
    """``backbone`` (a :class:`DilatedResNet`) and ``decode_head``; logits at the input size."""

    def __init__(self, backbone: DilatedResNet, num_classes: int, head: str = "daformer", embed_dim: int = 64,
                 channels: int = 64, dropout: float = 0.1, aspp_rates: Sequence[int] = (1, 2, 3, 4)) -> None:
        super().__init__()
        if head not in HEADS:
            raise ModelError(f"DeepLab head must be one of {HEADS}, got {head!r}")
        if num_classes < 1:
            raise ModelError(f"DeepLab num_classes must be at least 1, got {num_classes}")
        self.backbone, self.head = backbone, head
        if head == "daformer":
            self.decode_head: nn.Module = daformer_head(backbone.out_channels, embed_dim, channels, num_classes,
                                                        dropout)
        else:
            self.decode_head = ASPP(backbone.out_channels[-1], num_classes, aspp_rates)

    def _decode_daformer(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        head = self.decode_head
        size = feats[0].shape[2:]
        embedded = []
        for k, (f, embed) in enumerate(zip(feats, head["embed"])):
            e = embed(f)
            if any(s != 1 for s in self.backbone.strides[1:k + 1]):  # static (torch.fx traces it)
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        x = head["fuse"](torch.cat(embedded, dim=1))
        return head["conv_seg"](head["dropout"](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        logits = self._decode_daformer(feats) if self.head == "daformer" else self.decode_head(feats[-1])
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def deeplab_mini(num_classes: int = 19, width: int = 16, head: str = "daformer",
                 blocks: Sequence[int] = (1, 1, 1, 1), **kw) -> DeepLab:
    """A small DeepLab for CPU experiments: BasicBlock stages of widths (w, 2w, 4w, 4w), a one-conv
    stem of width ``w``, output stride 8; DAFormer head with embeddings and fusion of ``4w``
    channels (``embed_dim`` / ``channels`` override), or ``head="aspp"``."""
    if width < 1:
        raise ModelError(f"deeplab_mini width must be at least 1, got {width}")
    backbone = DilatedResNet(BasicBlock, blocks, (width, 2 * width, 4 * width, 4 * width), (width,),
                             in_channels=kw.pop("in_channels", 3))
    kw = {"embed_dim": 4 * width, "channels": 4 * width, **kw}
    return DeepLab(backbone, num_classes, head, **kw)


def deeplab_r101(num_classes: int = 19, head: str = "daformer", blocks: Sequence[int] = (3, 4, 23, 3),
                 **kw) -> DeepLab:
    """The paper's scale: ResNetV1c-101 (deep stem 32-32-64, Bottlenecks of widths 64..512) with
    DAFormer's head as HDRQ configures it (``embed_dims=786``, sic, ``channels=128``)."""
    backbone = DilatedResNet(Bottleneck, blocks, (64, 128, 256, 512), (32, 32, 64),
                             in_channels=kw.pop("in_channels", 3))
    kw = {"embed_dim": 786, "channels": 128, **kw}
    return DeepLab(backbone, num_classes, head, **kw)
