"""The augmentations of segmentation training and DACS self-training, in torch (no kornia, no
torchvision). Every draw comes from a CPU ``torch.Generator`` (the same draws on every device).

* :func:`flip_scale_crop`: mmseg's ``RandomFlip`` (p 0.5, image and label together) and a random
  zoom ``s ~ U(scale)`` (image bilinear, label nearest) cropped back to ``H x W`` at a random
  offset (mmseg's ``Resize`` with a ratio range + ``RandomCrop``, without ``cat_max_ratio``).
* :func:`class_mix_masks`: ClassMix as DACS does it (``get_class_masks`` in DAFormer's
  ``mmseg/models/utils/dacs_transforms.py``): of the ``n`` classes present in a source label,
  ``(n + n % 2) / 2`` (half, rounded up) drawn without replacement; the mask is where the label is
  one of them. Our choices: the classes are drawn per image from that image's label and the ignore
  index is never drawn (DAFormer's code calls ``torch.unique`` on the whole batch, 255 included).
  :func:`class_mix` pastes: image and label from the source inside the mask, from the target
  (pseudo-label) outside; pixel weight 1 inside, the pseudo weight outside.
* :func:`color_jitter`: kornia 0.5.8's ``ColorJitter(s, s, s, s)`` as DAFormer pins it, in the
  denormalised ``[0, 1]`` image (``x * std + mean``), each op clamped to ``[0, 1]``, in a random
  order per image: brightness ``+b``, ``b ~ U(-s, s)``; contrast ``*c``, ``c ~ U(1-s, 1+s)``;
  saturation ``c`` times the distance to the grey (Rec. 601 luma) image; hue rotated by ``h`` turns,
  ``h ~ U(-s, s)``, about the grey axis. Saturation and hue act as linear maps of RGB instead of
  kornia's HSV round trip (our choice: the same intent in a few lines). DAFormer's config says
  ``color_jitter_probability=0.2`` but its code jitters when ``U(0,1) > 0.2``, i.e. with
  probability 0.8: our ``p`` is the probability of jittering, so 0.8 reproduces DAFormer.
  For per-image standardised data (``streets``, ``digits``) the ImageNet constants map an image
  into about ``[0, 1]`` as well.
* :func:`gaussian_blur`: DAFormer's ``gaussian_blur``: with probability ``p`` (DAFormer: 0.5),
  ``sigma ~ U(0.15, 1.15)`` per image, kernel size ``floor(ceil(0.1 H) - 0.5 + ceil(0.1 H) % 2)``
  (the odd size next to a tenth of the side; 7 for 64 px), reflect padding (kornia's default).

As in DAFormer, whether to jitter / blur is drawn once per batch, the parameters per image.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..models.inputs import NAMED_MEAN_STD

IGNORE_INDEX = 255
IMAGENET_MEAN, IMAGENET_STD = NAMED_MEAN_STD["imagenet"]
_LUMA = (0.299, 0.587, 0.114)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def flip_scale_crop(x: torch.Tensor, y: torch.Tensor | None, g: torch.Generator, flip: bool = True,
                    scale: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image: horizontal flip with probability 0.5 (``flip``), zoom by ``s ~ U(scale)`` and a
    random ``H x W`` crop; labels ``y`` (``[N, H, W]`` or None) follow the image."""
    n, _, h, w = x.shape
    flips = torch.rand(n, generator=g) < 0.5
    zoom = _uniform(scale[0], scale[1], n, g)
    offs = torch.rand(n, 2, generator=g, dtype=torch.float64)
    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i:i + 1], (y[i:i + 1] if y is not None else None)
        if flip and flips[i]:
            xi, yi = xi.flip(-1), (yi.flip(-1) if yi is not None else None)
        if zoom[i] > 1.0:
            size = (max(h, round(h * float(zoom[i]))), max(w, round(w * float(zoom[i]))))
            top, left = int(offs[i, 0] * (size[0] - h + 1)), int(offs[i, 1] * (size[1] - w + 1))
            xi = F.interpolate(xi, size=size, mode="bilinear", align_corners=False)[..., top:top + h, left:left + w]
            if yi is not None:
                yi = F.interpolate(yi[:, None].float(), size=size, mode="nearest")[:, 0].to(y.dtype)
                yi = yi[..., top:top + h, left:left + w]
        xs.append(xi)
        ys.append(yi)
    return torch.cat(xs), (torch.cat(ys) if y is not None else None)


def class_mix_masks(labels: torch.Tensor, g: torch.Generator, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool masks ``[N, H, W]``: per image, where its label is one of ``ceil(n / 2)`` of its ``n``
    present classes, drawn without replacement (module docstring)."""
    masks = []
    for label in labels:
        present = label[label != ignore_index].unique()
        n = len(present)
        chosen = present[torch.randperm(n, generator=g)[:(n + n % 2) // 2].to(present.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)


def class_mix(mask: torch.Tensor, src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
              pseudo_label: torch.Tensor, pseudo_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DACS's ``one_mix`` of a batch: ``(image, label, pixel weight)`` = the source's where ``mask
    [N, H, W]`` (weight 1), the target image, its pseudo-label and its weight ``[N]`` elsewhere."""
    weight = torch.where(mask, torch.ones_like(pseudo_weight)[:, None, None], pseudo_weight[:, None, None])
    return torch.where(mask[:, None], src_img, tgt_img), torch.where(mask, src_label, pseudo_label), weight


def hue_matrix(turns: float) -> torch.Tensor:
    """The 3x3 rotation of RGB about the grey axis ``(1, 1, 1) / sqrt(3)`` by ``turns`` of a full
    turn (Rodrigues: ``cos a I + sin a [k]x + (1 - cos a) k k^T``)."""
    a, k = 2 * math.pi * turns, torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    return math.cos(a) * torch.eye(3, dtype=torch.float64) + math.sin(a) * cross + (1 - math.cos(a)) * torch.outer(k, k)


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.2, p: float = 0.8,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """With probability ``p`` (one draw per batch), jitter brightness, contrast, saturation and hue
    of each RGB image of ``x [N, 3, H, W]`` by ``strength`` (module docstring); else ``x`` itself."""
    if not torch.rand(1, generator=g).item() < p or x.shape[1] != 3:
        return x
    n, s = x.shape[0], strength
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    sd = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    bright, contrast, sat, hue = (_uniform(-s, s, n, g), _uniform(1 - s, 1 + s, n, g),
                                  _uniform(1 - s, 1 + s, n, g), _uniform(-s, s, n, g))
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    out = []
    for i in range(n):
        z = (x[i] * sd + m).clamp(0, 1)
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                z = z + float(bright[i])
            elif op == 1:
                z = z * float(contrast[i])
            elif op == 2:
                grey = torch.einsum("c,chw->hw", luma, z)[None]
                z = grey + float(sat[i]) * (z - grey)
            else:
                z = torch.einsum("ij,jhw->ihw", hue_matrix(float(hue[i])).to(z), z)
            z = z.clamp(0, 1)
        out.append((z - m) / sd)
    return torch.stack(out)


def blur_kernel_size(side: int) -> int:
    """DAFormer's Gaussian kernel size for an image side of ``side`` pixels (always odd)."""
    c = math.ceil(0.1 * side)
    return int(math.floor(c - 0.5 + c % 2))


def _gauss1d(k: int, sigma: float, dtype, device) -> torch.Tensor:
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float = 0.5,
                  sigma: tuple[float, float] = (0.15, 1.15)) -> torch.Tensor:
    """With probability ``p`` (one draw per batch), blur each image of ``x [N, C, H, W]`` with its
    own ``sigma ~ U(sigma)`` and DAFormer's kernel size; else ``x`` itself."""
    if not torch.rand(1, generator=g).item() < p:
        return x
    n, c, h, w = x.shape
    kh, kw = blur_kernel_size(h), blur_kernel_size(w)
    sigmas = _uniform(sigma[0], sigma[1], n, g)
    out = []
    for i in range(n):
        xi = x[i:i + 1]
        if kh > 1:
            k = _gauss1d(kh, float(sigmas[i]), x.dtype, x.device).view(1, 1, kh, 1).expand(c, 1, kh, 1)
            xi = F.conv2d(F.pad(xi, (0, 0, kh // 2, kh // 2), mode="reflect"), k, groups=c)
        if kw > 1:
            k = _gauss1d(kw, float(sigmas[i]), x.dtype, x.device).view(1, 1, 1, kw).expand(c, 1, 1, kw)
            xi = F.conv2d(F.pad(xi, (kw // 2, kw // 2, 0, 0), mode="reflect"), k, groups=c)
        out.append(xi)
    return torch.cat(out)
