"""Post-training quantization methods, each registered in ``PTQ_METHODS``."""
from . import rtn  # noqa: F401  (registers the method)
from .base import PTQContext, quantize

__all__ = ["PTQContext", "quantize"]
