"""RTN: round every weight to the nearest point of its MSE-searched per-channel grid;
activation steps by MSE on the calibration data. No reconstruction (the baseline of every table)."""
from torch import nn

from ..registry import PTQ_METHODS
from .base import PTQContext


@PTQ_METHODS.register("rtn")
def rtn(qmodel: nn.Module, ctx: PTQContext) -> None:
    if ctx.options:
        raise TypeError(f"rtn takes no options, got {sorted(ctx.options)}")
