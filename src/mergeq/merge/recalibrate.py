"""Recalibrating a merged model on the targets' unlabeled calibration data (``merge.recalibrate``).

A merge of BN-folded experts has lost what BatchNorm re-estimation would restore: each expert's
layers were normalised on its own domain, their average is normalised on none, and its
activation steps are averages of steps fitted to other models. Two corrections, both on the
unlabeled calibration images each expert was quantized with (the data PTQ already uses; the
merge then needs every target's images, or, for ``bn``, each expert's per-channel statistics and
the pooled images):

* ``act``: every activation step of the merged model re-estimated on the pooled images, with the
  MSE search PTQ initialises steps with (:meth:`mergeq.quant.ActQuantizer.init_from`).
* ``bn``: REPAIR (Jordan et al., ICLR 2023, Sec. 3) for the multi-domain merge. Layer by layer
  in execution order, every quantized or full-precision Conv2d/Linear but the last (the
  classifier) gets its per-channel output mean and standard deviation, measured on the pooled
  images, set to those of the mixture of the experts, each measured on its own images:
  μ* = Σ α_k μ_k, σ*² = Σ α_k (σ_k² + μ_k²) − μ*² (the mixture rule of BN statistics in
  :mod:`mergeq.merge.average`). The correction y' = (y − μ) σ*/σ + μ* is a per-channel scale
  and bias: a quantized layer scales its weight steps (the integer codes are unchanged, the
  weights stay on their grid) and its bias. Our choice where the paper is silent: the merged
  model's statistics are the α-mixture of its per-domain statistics (equal to the pooled images'
  for equal α and equal counts), and channels whose merged standard deviation is below 1e-6
  only get the mean shift.
* ``bn+act``: ``bn``, then ``act``.

``none`` leaves the merge as it is (the data-free merge of the papers). The HDRQ paper merges
without data; the re-estimation is this project's lever against the merge's sensitivity
(docs/RESULTS.md, the recalibration section), off unless chosen.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import CalibrationDataError
from ..nn.prepare import StopForward, calibrate_activations, call_order, forward_batches
from ..nn.qmodule import QuantModule

RECALIBRATIONS = ("none", "act", "bn", "bn+act")
_LAYERS = (nn.Conv2d, nn.Linear, QuantModule)
_MIN_STD = 1e-6


def _layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv2d/Linear/QuantModule layers in the order a forward pass calls them."""
    return call_order(model, [n for n, m in model.named_modules() if isinstance(m, _LAYERS)], example)


@torch.no_grad()
def _moments(model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int) -> dict[str, tuple]:
    """Per-channel E[y] and E[y²] of each named layer's output on ``x`` (channel: dim 1 of a conv
    output, the last dim of a linear one). ``names`` in execution order: each forward stops after
    the last of them."""
    sums: dict[str, list] = {}

    def hook(name: str):
        def f(mod, inp, out):
            y = out.detach().double()
            y = y.transpose(0, 1).flatten(1) if y.dim() == 4 else y.flatten(0, -2).T
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + y.sum(1)
            s[1] = s[1] + y.square().sum(1)
            s[2] += y.shape[1]
            if name == names[-1]:
                raise StopForward
        return f

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        forward_batches(model, x, batch_size, next(model.parameters()).device)
    finally:
        for h in hooks:
            h.remove()
    return {n: (s[0] / s[2], s[1] / s[2]) for n, s in sums.items()}


def _mixture(moments: Sequence[tuple], alphas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the α-mixture of per-domain (E[y], E[y²])."""
    mean = sum(a * m[0] for a, m in zip(alphas, moments))
    second = sum(a * m[1] for a, m in zip(alphas, moments))
    return mean, (second - mean.square()).clamp_min(0).sqrt()


@torch.no_grad()
def _scale_layer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """y -> y · scale + shift per output channel: a QuantModule scales its weight steps and keeps
    its integer codes (the weight stays exactly on its grid), any other layer scales its weight."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    if isinstance(layer, QuantModule):
        if layer.w_step.dim() == 0 or layer.w_step.shape[0] != layer.weight.shape[0]:
            raise CalibrationDataError(f"merge.recalibrate bn scales per-channel weight steps; the layer has "
                                       f"a step of shape {tuple(layer.w_step.shape)}")
        codes = layer.int_weight()
        layer.w_step.mul_(scale.reshape(shape).to(layer.w_step))
        layer.weight.copy_(codes * layer.w_step)
    else:
        layer.weight.mul_(scale.reshape(shape).to(layer.weight))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    layer.bias.mul_(scale.to(layer.bias)).add_(shift.to(layer.bias))


def repair_statistics(merged: nn.Module, experts: Sequence[nn.Module], calib: Sequence[torch.Tensor],
                      alphas: Sequence[float], batch_size: int = 256) -> None:
    """``bn``: the REPAIR correction of every layer but the last, in place (module docstring)."""
    names = _layers(merged, calib[0][:2].to(next(merged.parameters()).device))[:-1]
    targets = [_moments(e, names, x, batch_size) for e, x in zip(experts, calib)]
    for name in names:
        mean_t, std_t = _mixture([t[name] for t in targets], alphas)
        mean_m, std_m = _mixture([_moments(merged, [name], x, batch_size)[name] for x in calib], alphas)
        ok = std_m > _MIN_STD
        scale = torch.where(ok, std_t / std_m.clamp_min(_MIN_STD), torch.ones_like(std_m))
        _scale_layer(merged.get_submodule(name), scale.float(), (mean_t - mean_m * scale).float())


@torch.no_grad()
def reestimate_activation_steps(model: nn.Module, calib: Sequence[torch.Tensor], batch_size: int = 256) -> None:
    """``act``: every activation step of ``model`` re-estimated (MSE) on the pooled ``calib``."""
    calibrate_activations(model, torch.cat(list(calib)), batch_size)


def recalibrate(merged: nn.Module, experts: Sequence[nn.Module], calib: Sequence[torch.Tensor],
                mode: str = "none", weights: Sequence[float] | None = None, batch_size: int = 256) -> nn.Module:
    """Apply recalibration ``mode`` (:data:`RECALIBRATIONS`) to ``merged`` in place and return it.

    ``calib[k]`` holds the unlabeled calibration images of expert ``k``'s domain; ``weights`` are
    the merge weights α (default equal)."""
    if mode not in RECALIBRATIONS:
        raise ValueError(f"merge.recalibrate: unknown mode {mode!r}; known: {', '.join(RECALIBRATIONS)}")
    if mode == "none":
        return merged
    if len(calib) != len(experts):
        raise ValueError(f"merge.recalibrate: one calibration set per expert expected, got {len(calib)} "
                         f"sets for {len(experts)} experts")
    for k, x in enumerate(calib):
        if len(x) == 0 or not torch.isfinite(x).all():
            raise CalibrationDataError(f"merge.recalibrate: the calibration images of expert {k} are "
                                       f"{'empty' if len(x) == 0 else 'not finite (NaN or Inf)'}")
    alphas = [1.0 / len(experts)] * len(experts) if weights is None else [w / sum(weights) for w in weights]
    if mode.startswith("bn"):
        repair_statistics(merged, experts, calib, alphas, batch_size)
    if mode.endswith("act"):
        reestimate_activation_steps(merged, calib, batch_size)
    return merged
