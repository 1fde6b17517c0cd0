"""Per-tensor activation quantizer with a learnable (LSQ) step.

LSQ (Esser et al., 2020): x̂ = clamp(round(x / s), q_min, q_max) · s with the gradient of s
scaled by g = 1 / sqrt(N · q_max). The step is initialised by an MSE search over clipping
ratios of the calibration activations' absolute maximum. The grid is unsigned when the
calibration activations are non-negative (after ReLU) and signed otherwise.

``drop_prob`` implements QDrop (Wei et al., 2022, Sec. 3.3): while training, each element keeps
its full-precision value with probability ``drop_prob`` instead of its quantized one. At a
reconstruction unit's input the full-precision value is the FP model's input (``fp_input``,
set by ptq.recon for each step), not the quantizer's own input. The
training forward is one fused autograd node (quant.fakequant.lsq_fake_quant). The grid bounds
are kept as Python numbers next to the ``signed``/``initialized`` buffers, so a forward never
reads a device tensor back to the host.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CalibrationDataError
from .fakequant import bernoulli_mask, lsq_fake_quant
from .uniform import check_bits, qrange

_MAX_OBSERVED = 1 << 18  # elements kept per quantizer while calibrating (bounded memory)


class ActQuantizer(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self.drop_prob = 0.0
        self._observed: list[torch.Tensor] | None = None
        self._grid: tuple[int, int] | None = None  # (q_min, q_max) once calibrated
        # QDrop at a unit's input (ptq.recon): (keep mask, x_fp) for the next training forward
        self.fp_input: tuple[torch.Tensor, torch.Tensor] | None = None
        self.noise: str | None = None  # HDRQ's act_noise: pseudo-quantization noise while training

    def _sync_grid(self) -> None:
        self._grid = qrange(self.bits, bool(self.signed)) if bool(self.initialized) else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_grid()

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
        errs = torch.cat([  # ten candidate steps at a time, in place: one buffer per chunk
            torch.div(x, s[:, None]).round_().clamp_(lo, hi).mul_(s[:, None]).sub_(x).square_().mean(dim=1)
            for s in steps.split(10)
        ])
        best = steps[int(torch.argmin(errs))]
        self.signed.fill_(signed)
        self.step.data.fill_(float(best))
        self.initialized.fill_(True)
        self._sync_grid()

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
        if self._grid is None:
            raise CalibrationDataError("activation quantizer used before calibration")
        lo, hi = self._grid
        if not self.training:  # straight-through for x (test-time adaptation trains through it)
            return lsq_fake_quant(x, self.step, lo, hi)
        g = 1.0 / math.sqrt(x.numel() // x.shape[0] * hi)  # the numel of one sample, x[0] (a view op)
        keep, alt = self.fp_input if self.fp_input is not None else (None, None)
        if keep is None and self.drop_prob > 0:
            keep = bernoulli_mask(x, self.drop_prob)
        if self.noise is not None:
            from ..ptq.noise import noisy_quant  # HDRQ's option: the slower, unfused path

            step = (self.step - self.step * g).detach() + self.step * g  # LSQ gradient scale
            out = noisy_quant(x, step.abs().clamp_min(1e-8), lo, hi, self.noise)
            return out if keep is None else torch.lerp(out, x if alt is None else alt, keep)
        return lsq_fake_quant(x, self.step, lo, hi, g, keep, alt)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, step={float(self.step.detach()):.4g}"
