"""Post-training quantization methods, each registered in ``PTQ_METHODS``."""
from . import adaround, brecq, epmq, gptq, hdrq, qdrop, rtn, ttaq  # noqa: F401  (registers the methods)
from ..registry import PTQ_METHODS
from .base import PTQContext, check_options, quantize
from .presets import calib_size, ptq_options

__all__ = ["PTQ_METHODS", "PTQContext", "calib_size", "check_options", "ptq_options", "quantize"]
