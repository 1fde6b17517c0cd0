"""Quantized layer wrappers, BatchNorm folding and model preparation for any nn.Module."""
from .fold import fold_bn, has_batchnorm
from .prepare import calibrate_activations, execution_order, prepare
from .qmodule import QuantModule, RoundToNearest, quant_modules, set_quant_state

__all__ = [
    "QuantModule",
    "RoundToNearest",
    "calibrate_activations",
    "execution_order",
    "fold_bn",
    "has_batchnorm",
    "prepare",
    "quant_modules",
    "set_quant_state",
]
