"""The numbers: uniform quantizers, step-size search, straight-through fake quantization."""
from .uniform import (
    check_bits,
    fake_quantize,
    qrange,
    quantize_int,
    round_ste,
    search_weight_step,
)
from .act import ActQuantizer

__all__ = [
    "ActQuantizer",
    "check_bits",
    "fake_quantize",
    "qrange",
    "quantize_int",
    "round_ste",
    "search_weight_step",
]
