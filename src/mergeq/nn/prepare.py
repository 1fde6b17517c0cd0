"""Turn any nn.Module into a quantized one: fold BatchNorm, wrap each Conv2d/Linear in a QuantModule.

The first and last Conv2d/Linear (in execution order, traced on an example input; in
registration order without one) get ``first_last_bits`` for weights and input activations.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.config import QuantConfig
from .fold import set_module, fold_bn
from .qmodule import QuantModule, quant_modules

_LAYERS = (nn.Conv2d, nn.Linear)


def call_order(model: nn.Module, names: list[str], example_input: torch.Tensor) -> list[str]:
    """The submodules ``names`` in the order a forward pass on ``example_input`` first calls them."""
    order: list[str] = []
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: order.append(n) if n not in order else None)
        for n in names
    ]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order


class StopForward(Exception):
    """Raised by a forward hook once the rest of the forward pass is not needed (see :func:`forward_batches`)."""


def forward_batches(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> None:
    """``model`` in eval mode on ``x`` batch by batch, for its hooks; a hook may end a batch's
    forward early by raising :class:`StopForward`."""
    model.eval()
    for i in range(0, len(x), batch_size):
        try:
            model(x[i:i + batch_size].to(device))
        except StopForward:
            pass


def execution_order(model: nn.Module, example_input: torch.Tensor | None) -> list[str]:
    """Names of the Conv2d/Linear layers in the order they run (registration order if no input)."""
    names = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if example_input is None:
        return names
    order = call_order(model, names, example_input)
    return order + [n for n in names if n not in order]


def prepare(model: nn.Module, config: QuantConfig, example_input: torch.Tensor | None = None) -> nn.Module:
    """Copy of ``model`` with BN folded (if ``config.fold_bn``) and Conv2d/Linear layers wrapped."""
    model = fold_bn(model, example_input) if config.fold_bn else copy.deepcopy(model)
    model.eval()
    order = execution_order(model, example_input)
    if not order:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to quantize")
    ends = {order[0], order[-1]} if config.first_last_bits is not None else set()
    for name in order:
        edge = name in ends
        w_bits = config.first_last_bits if edge else config.w_bits
        a_bits = None if config.a_bits is None else (config.first_last_bits if edge else config.a_bits)
        set_module(model, name, QuantModule(model.get_submodule(name), w_bits, a_bits, config.step_method))
    return model


@torch.no_grad()
def calibrate_activations(model: nn.Module, calib: torch.Tensor, batch_size: int = 128) -> None:
    """Initialise every activation step by MSE on ``calib`` (weights quantized, activations observed)."""
    qs = [m.act_quant for _, m in quant_modules(model) if m.act_quant is not None]
    if not qs:
        return
    for q in qs:
        q.start_observing()
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(calib), batch_size):
        model(calib[i : i + batch_size].to(device))
    for q in qs:
        q.finish_observing()
