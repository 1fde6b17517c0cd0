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
from .config import QuantConfig, parse_bits

__all__ = [
    "ActQuantizer",
    "QuantConfig",
    "parse_bits",
    "check_bits",
    "fake_quantize",
    "qrange",
    "quantize_int",
    "round_ste",
    "search_weight_step",
]
