"""Quantized layer wrappers, BatchNorm folding and model preparation for any nn.Module."""
from .fold import fold_bn, has_batchnorm
from .output import LogitsAdapter, select_logits
from .prepare import calibrate_activations, execution_order, prepare
from .qmodule import QuantModule, RoundToNearest, quant_modules, set_quant_state

__all__ = [
    "LogitsAdapter",
    "QuantModule",
    "RoundToNearest",
    "calibrate_activations",
    "execution_order",
    "fold_bn",
    "has_batchnorm",
    "prepare",
    "quant_modules",
    "select_logits",
    "set_quant_state",
]
