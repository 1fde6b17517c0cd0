"""Sliding-window inference for segmentation, as mmsegmentation's ``slide_inference``
(``mmseg/models/segmentors/encoder_decoder.py``; HRDA and the HDRQ reference evaluate Cityscapes
at 2048 x 1024 with 1024 x 1024 windows, stride 512).

Windows of ``crop`` = (h, w) start every ``stride`` pixels, ``max(H - h + s_h - 1, 0) // s_h + 1``
of them per column (and likewise per row); the last one is moved back inside the image, so every
window lies within it (a window is the whole side where the image is smaller). Each window's
logits are added into their place and divided by the number of windows covering each pixel.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.output import select_logits


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """The first pixel of each window along one side of ``size`` pixels."""
    if crop < 1 or stride < 1:
        raise ValueError(f"window crop and stride must be positive, got crop {crop}, stride {stride}")
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(n)]


class SlidingWindow(nn.Module):
    """``model`` applied window by window (module docstring); ``model`` is a submodule."""

    def __init__(self, model: nn.Module, crop: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.crop, self.stride = model, tuple(crop), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (ch, cw), (sh, sw) = x.shape[-2:], self.crop, self.stride
        total = count = None
        for top in window_starts(h, ch, sh):
            for left in window_starts(w, cw, sw):
                out = select_logits(self.model(x[..., top:top + ch, left:left + cw]))
                if total is None:
                    total = out.new_zeros(*out.shape[:2], h, w)
                    count = out.new_zeros(1, 1, h, w)
                total[..., top:top + out.shape[-2], left:left + out.shape[-1]] += out
                count[..., top:top + out.shape[-2], left:left + out.shape[-1]] += 1
        return total / count
