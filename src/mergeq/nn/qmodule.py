"""QuantModule: a Conv2d or Linear whose weight (per output channel) and input activation
(per tensor) are fake-quantized. ``w_step`` is per output channel (``[C, 1, ...]``) or, after
GPTQ with ``group_size``, per weight element (the weight's shape): every use is elementwise.

Activations are quantized where they enter a Conv2d/Linear (the QDQ placement ONNX uses), so
every layer sees quantized inputs whatever the surrounding architecture. How the weight is
rounded is pluggable (``w_quantizer``): round-to-nearest by default; reconstruction methods
swap in AdaRound's learned rounding or HDRQ's noise, then :meth:`QuantModule.finalize` bakes
the result so ``weight`` lies exactly on the grid ``w_step · [-2^(b-1), 2^(b-1)-1]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import ActQuantizer, check_bits, fake_quantize, quantize_int, search_weight_step


class RoundToNearest(nn.Module):
    """Default weight rounding: clamp(round(w/Δ))·Δ with a straight-through gradient."""

    def forward(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        return fake_quantize(w, step, bits)

    def hard(self, w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize_int(w, step, bits) * step


class QuantModule(nn.Module):
    def __init__(
        self,
        layer: nn.Module,
        w_bits: int,
        a_bits: int | None,
        step_method: str = "mse",
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantModule wraps nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            if layer.padding_mode != "zeros":
                raise ValueError(f"QuantModule supports zero padding only, got {layer.padding_mode!r}")
            self.conv_kwargs = dict(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
            )
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self.w_bits = check_bits(w_bits, "weight bits")
        self.register_buffer("w_step", search_weight_step(self.weight, w_bits, step_method))
        self.w_quantizer: nn.Module = RoundToNearest()
        # on the layer's device: a GPU model's activation step trains there (no host copy per step)
        self.act_quant = ActQuantizer(a_bits).to(self.weight.device) if a_bits is not None else None
        self.quant_weight = True
        self.quant_act = True

    @property
    def a_bits(self) -> int | None:
        return self.act_quant.bits if self.act_quant is not None else None

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quantizer(self.weight, self.w_step, self.w_bits) if self.quant_weight else self.weight

    def int_weight(self) -> torch.Tensor:
        """Integer codes of the current weight on its grid (exact once finalized)."""
        return quantize_int(self.weight.detach(), self.w_step, self.w_bits)

    def _linear_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_kwargs)
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None and self.quant_act:
            x = self.act_quant(x)
        return self._linear_op(x, self.quantized_weight())

    def forward_fp(self, x: torch.Tensor) -> torch.Tensor:
        """The full-precision layer (no weight or activation quantization)."""
        return self._linear_op(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        step = state_dict.get(prefix + "w_step")
        if step is not None and step.shape == self.weight.shape:  # grouped steps (GPTQ group_size)
            self.w_step = torch.empty_like(step)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def on_grid(self) -> bool:
        """True if ``weight`` equals its codes (in the ``w_bits`` range) times ``w_step`` exactly."""
        w = self.weight.detach()
        return torch.equal(quantize_int(w, self.w_step, self.w_bits) * self.w_step, w)

    @torch.no_grad()
    def finalize(self) -> None:
        """Bake the rounding into ``weight`` (on the grid) and return to round-to-nearest."""
        self.weight.data = self.w_quantizer.hard(self.weight, self.w_step, self.w_bits).detach().clone()
        self.w_quantizer = RoundToNearest()

    def extra_repr(self) -> str:
        return f"{self.kind}, out={self.weight.shape[0]}, w_bits={self.w_bits}, a_bits={self.a_bits}"


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> None:
    for _, m in quant_modules(model):
        m.quant_weight, m.quant_act = weight, act
