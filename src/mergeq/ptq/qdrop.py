"""QDrop (Wei et al., ICLR 2022): BRECQ with randomly dropped activation quantization.

During reconstruction only, every activation-quantized element keeps its full-precision value
with probability p = 0.5 (ActQuantizer.drop_prob; Sec. 3.3, û = u + m ⊙ (Q(u) - u) with
m ~ Bernoulli(1 - p)), and the unit input likewise mixes x_fp and x_q element-wise
(ptq.recon). Everything else (AdaRound rounding, LSQ act steps, schedule) is BRECQ's.
"""
from __future__ import annotations

from torch import nn

from ..registry import PTQ_METHODS
from .adaround import AdaRoundOptions
from .base import PTQContext
from .brecq import block_adaround


@PTQ_METHODS.register("qdrop", options=AdaRoundOptions)
def qdrop(qmodel: nn.Module, ctx: PTQContext) -> None:
    block_adaround(qmodel, ctx, "qdrop", {"drop_prob": 0.5})
