"""The PTQ entry point ``quantize`` and the context every registered method receives.

A PTQ method is ``fn(qmodel, ctx) -> None``: it refines a prepared model in place (weights
wrapped in QuantModules, activation steps initialised on the calibration data); ``quantize``
then bakes every weight onto its grid. Register with ``@PTQ_METHODS.register(name)``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data_utils import DataLike, as_tensor
from ..errors import ConfigError, IncompatibleModelsError
from ..merge.checks import check_mergeable
from ..nn import calibrate_activations, fold_bn, prepare, quant_modules
from ..quant import quantize_int
from ..quant.config import QuantConfig
from ..registry import PTQ_METHODS
from ..typed import check_keys, hints_of

log = logging.getLogger(__name__)


@dataclass
class PTQContext:
    fp_model: nn.Module  # the full-precision model after the same BN folding, eval mode, frozen
    calib: torch.Tensor  # calibration inputs
    config: QuantConfig
    source: nn.Module | None = None  # the source model after the same BN folding (HDRQ's distance term)
    device: torch.device = torch.device("cpu")
    seed: int = 0
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # what the method measured (recon losses)
    raw_model: nn.Module | None = None  # the model before BN folding (eval mode, frozen)
    raw_source: nn.Module | None = None  # the source model before BN folding


def check_options(method: str, options: dict[str, Any], where: str = "ptq.options") -> None:
    """Refuse, before any work, option keys ``method`` does not take (its registered options
    dataclass), values of the wrong type and values out of range; each error names the key."""
    PTQ_METHODS.get(method)
    cls = PTQ_METHODS.options(method)
    options = check_keys(options, hints_of(cls) if cls is not None else {}, f"{where}.{method}")
    if cls is not None:
        try:
            cls.from_kwargs(method, options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.{method}: {e}") from None


def quantize(
    model: nn.Module,
    method: str = "rtn",
    calib: DataLike | None = None,
    w_bits: int = 4,
    a_bits: int | None = 4,
    config: QuantConfig | None = None,
    source: nn.Module | None = None,
    calib_size: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` with the PTQ ``method`` on ``calib`` and return a new quantized model.

    ``config`` overrides ``w_bits``/``a_bits``. Method-specific ``options`` (e.g. ``iters``)
    go to the method. The input model is not modified.
    """
    fn = PTQ_METHODS.get(method)
    config = config or QuantConfig(w_bits=w_bits, a_bits=a_bits)
    if calib is None:
        raise ValueError("quantize needs calibration data (calib=...): a tensor, Dataset or DataLoader")
    if source is not None:  # HDRQ's distance target: refuse another architecture before any work
        try:
            check_mergeable([model, source])
        except IncompatibleModelsError as e:
            raise IncompatibleModelsError(f"the source model does not match the model to quantize "
                                          f"(model 0: the model, model 1: the source): {e}") from None
    x = as_tensor(calib, limit=calib_size)
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    example = x[:2].to(device)
    qmodel = prepare(model, config, example)
    fp_model = fold_bn(model, example) if config.fold_bn else model
    fp_model.requires_grad_(False)
    model.requires_grad_(False)
    src = raw_src = None
    if source is not None:
        raw_src = copy.deepcopy(source).to(device).eval().requires_grad_(False)
        src = fold_bn(raw_src, example).requires_grad_(False) if config.fold_bn else raw_src
    torch.manual_seed(seed)
    calibrate_activations(qmodel, x.to(device))
    ctx = PTQContext(fp_model, x, config, src, device, seed, progress, dict(options),
                     raw_model=model, raw_source=raw_src)
    log.info("quantizing with %s at %s on %d calibration inputs", method, config.tag, len(x))
    fn(qmodel, ctx)
    for _, m in quant_modules(qmodel):
        m.finalize()
    qmodel.eval().requires_grad_(False)
    qmodel.mergeq_meta = {"method": method, "w_bits": config.w_bits, "a_bits": config.a_bits, "calib_size": len(x),
                          "changed_codes": changed_codes(qmodel, fp_model), **ctx.report}
    return qmodel


def changed_codes(qmodel: nn.Module, fp_model: nn.Module) -> float:
    """Fraction of ``qmodel``'s weight codes that differ from round-to-nearest of the full-precision
    weights on the same grids (0 for RTN; how far a method moved its rounding)."""
    changed = total = 0
    for name, m in quant_modules(qmodel):
        rtn = quantize_int(fp_model.get_submodule(name).weight.detach(), m.w_step, m.w_bits)
        changed += int((m.int_weight() != rtn).sum())
        total += rtn.numel()
    return changed / max(total, 1)
