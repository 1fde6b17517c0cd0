"""mergeq: many domain-adapted experts into one low-bit model.

    import mergeq
    q = mergeq.quantize(expert, method="hdrq", calib=x, w_bits=4, a_bits=4, source=source)
    merged = mergeq.merge([q1, q2, q3], method="average")
    print(mergeq.evaluate(merged, test_sets))
"""
__version__ = "0.1.0"

from . import merge  # noqa: E402  (a callable package: mergeq.merge(models, ...) and mergeq.merge.ties)
from .eval import evaluate, harmonic_mean  # noqa: E402
from .ptq import quantize  # noqa: E402
from .quant.config import QuantConfig  # noqa: E402

__all__ = ["QuantConfig", "__version__", "evaluate", "harmonic_mean", "merge", "quantize"]
