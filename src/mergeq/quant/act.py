"""Per-tensor activation quantizer with a learnable (LSQ) step.

LSQ (Esser et al., 2020): x̂ = clamp(round(x / s), q_min, q_max) · s with the gradient of s
scaled by g = 1 / sqrt(N · q_max). The step is initialised by an MSE search over clipping
ratios of the calibration activations' absolute maximum. The grid is unsigned when the
calibration activations are non-negative (after ReLU) and signed otherwise.

``drop_prob`` implements QDrop (Wei et al., 2022, Sec. 3.3): while training, each element keeps
its full-precision value with probability ``drop_prob`` instead of its quantized one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CalibrationDataError
from .uniform import check_bits, qrange, round_ste

_MAX_OBSERVED = 1 << 18  # elements kept per quantizer while calibrating (bounded memory)


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x - x * scale).detach() + x * scale


class ActQuantizer(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self.drop_prob = 0.0
        self._observed: list[torch.Tensor] | None = None

    # -- calibration -------------------------------------------------------------------
    def start_observing(self) -> None:
        self._observed = []

    def finish_observing(self) -> None:
        """Set the sign and the MSE-optimal step from the activations seen since ``start_observing``."""
        if not self._observed:
            raise CalibrationDataError("activation quantizer saw no calibration data")
        x = torch.cat(self._observed)
        self._observed = None
        if not torch.isfinite(x).all():
            raise CalibrationDataError("calibration activations contain NaN or Inf")
        self.init_from(x)

    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        signed = bool((x < 0).any())
        lo, hi = qrange(self.bits, signed)
        top = x.abs().max().clamp_min(1e-8)
        steps = top * (1.0 - torch.arange(100, dtype=x.dtype) / 100) / hi  # clip ratios 1.00 .. 0.01
        errs = torch.cat([
            ((torch.clamp(torch.round(x / s[:, None]), lo, hi) * s[:, None] - x) ** 2).mean(dim=1)
            for s in steps.split(10)
        ])
        best = steps[int(torch.argmin(errs))]
        self.signed.fill_(signed)
        self.step.data.fill_(float(best))
        self.initialized.fill_(True)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            seen = sum(t.numel() for t in self._observed)
            budget = min(_MAX_OBSERVED // 8, _MAX_OBSERVED - seen)
            if budget > 0:
                flat = x.detach().flatten()
                if flat.numel() > budget:  # a seeded random subset: a stride can alias with W
                    g = torch.Generator(device=flat.device).manual_seed(len(self._observed))
                    flat = flat[torch.randint(flat.numel(), (budget,), generator=g, device=flat.device)]
                self._observed.append(flat.cpu())
            return x
        if not bool(self.initialized):
            raise CalibrationDataError("activation quantizer used before calibration")
        lo, hi = qrange(self.bits, bool(self.signed))
        g = 1.0 / math.sqrt(x[0].numel() * hi) if self.training else 1.0
        s = _grad_scale(self.step, g).abs().clamp_min(1e-8)
        xq = torch.clamp(round_ste(x / s), lo, hi) * s
        if self.training and self.drop_prob > 0:
            keep_fp = torch.rand_like(x) < self.drop_prob
            xq = torch.where(keep_fp, x, xq)
        return xq

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, step={float(self.step):.4g}"
