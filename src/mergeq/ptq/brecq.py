"""BRECQ (Li et al., ICLR 2021): block-wise reconstruction with AdaRound rounding.

Each unit of nn.blocks.partition (residual blocks; stem and head alone) minimises
‖F_fp(x_fp) - F_q(x_q)‖² (Eq. 7 of the paper) over the AdaRound variables V of its layers plus
the AdaRound regulariser (ptq.adaround), with activations quantized and their steps learned
by LSQ (Adam, lr 4e-5, cosine annealing). Defaults: 20,000 iterations per block, batch 32.
"""
from __future__ import annotations

from torch import nn

from ..registry import PTQ_METHODS
from .adaround import AdaRoundHooks, AdaRoundOptions
from .base import PTQContext
from .recon import reconstruct


def block_adaround(qmodel: nn.Module, ctx: PTQContext, method: str, defaults: dict) -> None:
    """Shared by BRECQ and QDrop: they differ only in the default ``drop_prob``."""
    opts = AdaRoundOptions.from_kwargs(method, {**defaults, **ctx.options})
    reconstruct(qmodel, ctx, AdaRoundHooks(opts, learn_act=ctx.config.a_bits is not None), opts)


@PTQ_METHODS.register("brecq", options=AdaRoundOptions)
def brecq(qmodel: nn.Module, ctx: PTQContext) -> None:
    block_adaround(qmodel, ctx, "brecq", {"drop_prob": 0.0})
