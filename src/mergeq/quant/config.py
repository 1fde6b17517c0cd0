"""Quantization settings, a dataclass in the torchao style (``quantize(model, config)``)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .uniform import STEP_METHODS, check_bits


@dataclass
class QuantConfig:
    """Bit widths and grid choices shared by every PTQ method.

    ``first_last_bits``: bits for the first and last Conv2d/Linear (8 by BRECQ/QDrop/HDRQ
    convention; ``None`` quantizes them like the rest). ``a_bits=None`` means weight-only.
    ``step_method``: weight step search, ``mse`` | ``lp`` | ``absmax`` (see quant.uniform).
    ``fold_bn``: fold every BatchNorm into the preceding layer before quantization (default);
    ``False`` keeps BN as a module after its quantized conv (running statistics used during PTQ),
    for test-time adaptation of BN (TTAQ / TENT, ``mergeq.adapt.tta``).
    """

    w_bits: int = 4
    a_bits: int | None = 4
    first_last_bits: int | None = 8
    step_method: str = "mse"
    fold_bn: bool = True

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.step_method not in STEP_METHODS:
            raise ValueError(f"step_method must be one of {STEP_METHODS}, got {self.step_method!r}")

    @property
    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits if self.a_bits is not None else 32}"


def parse_bits(spec: str) -> tuple[int, int | None]:
    """``'W4A8'`` -> (4, 8); ``'W4'`` or ``'W4A32'`` -> (4, None). Raises ValueError otherwise
    (``'W4A'``, a missing number, too)."""
    match = re.fullmatch(r"W([0-9]+)(?:A([0-9]+))?", spec.strip().upper())
    if match is None:
        raise ValueError(f"bit spec must look like W4A4 or W4, got {spec!r}")
    w_bits = int(match[1])
    a_bits = None if match[2] in (None, "32") else int(match[2])
    check_bits(w_bits, f"weight bits in {spec!r}")
    if a_bits is not None:
        check_bits(a_bits, f"activation bits in {spec!r}")
    return w_bits, a_bits
