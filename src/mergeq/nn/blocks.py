"""Partition any model into reconstruction units (BRECQ's blocks), for the shared PTQ loop.

Rule (applied to the children of a module, starting at the root):

* a child holding no QuantModule (ReLU, pooling, folded-BN ``Identity``) is skipped;
* a ``QuantModule`` (or bare Conv2d/Linear) child is a unit on its own (stem conv, classifier head, VGG layers);
* a *container* (``nn.ModuleList``/``nn.ModuleDict``, or an ``nn.Sequential`` whose forward is
  the plain chain) is not a unit: we recurse into it (``layer1..4``, nested Sequentials);
* any other module has its own forward (a residual block, a whole sub-network). It is a
  *block* and becomes one unit if none of its descendants is itself a non-container module
  holding two or more QuantModules (BasicBlock, Bottleneck, InvertedResidual); otherwise it
  is a network of blocks and we recurse into it (ResNet inside a wrapper).

A ``LogitsAdapter`` (``nn.output``) is walked into as if its model were the root.

Units come back in execution order when an example input is given (traced with hooks; units
the forward never calls are dropped), else in registration order. Each unit must take one
tensor and return one tensor, which holds for the models above; the trace checks it and
refuses a unit called with several tensors or keyword arguments, naming the unit (the last
unit of a ``LogitsAdapter`` may return the dict / tuple its selector reads).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .output import LogitsAdapter, describe_output
from .prepare import call_order
from .qmodule import QuantModule


_LEAVES = (QuantModule, nn.Conv2d, nn.Linear)  # unwrapped models partition the same way


def _n_quant(m: nn.Module) -> int:
    return sum(isinstance(x, _LEAVES) for x in m.modules())


def is_container(m: nn.Module) -> bool:
    """ModuleList/ModuleDict, or a Sequential (subclass) that keeps the plain chained forward."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
        return True
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def is_block(m: nn.Module) -> bool:
    """A module with its own forward and no nested sub-block of two or more QuantModules."""
    if isinstance(m, _LEAVES) or is_container(m) or _n_quant(m) == 0:
        return False
    for d in m.modules():
        if d is m or isinstance(d, _LEAVES) or is_container(d):
            continue
        if _n_quant(d) >= 2:
            return False
    return True


def _walk(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]], layerwise: bool) -> None:
    transparent = isinstance(module, LogitsAdapter)  # its model is walked like a root
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if _n_quant(child) == 0:
            continue
        if isinstance(child, _LEAVES) or (not layerwise and not transparent and is_block(child)):
            out.append((full, child))
        else:
            _walk(child, full, out, layerwise)


def partition(
    model: nn.Module, example_input: torch.Tensor | None = None, layerwise: bool = False
) -> list[tuple[str, nn.Module]]:
    """``[(name, unit), ...]`` by the rule above; ``layerwise=True`` gives every QuantModule alone."""
    if isinstance(model, _LEAVES):
        return [("", model)]
    units: list[tuple[str, nn.Module]] = []
    _walk(model, "", units, layerwise)
    if example_input is None:
        return units
    by_name = dict(units)
    calls: dict[str, tuple] = {}

    def check(name: str):
        def hook(mod, args, kwargs, out):
            if name in calls:
                return
            calls[name] = (torch.is_tensor(out), describe_output(out))
            if kwargs or len(args) != 1 or not torch.is_tensor(args[0]):
                got = ", ".join([describe_output(a) if not torch.is_tensor(a) else "a tensor" for a in args]
                                + [f"{k}=..." for k in kwargs]) or "no arguments"
                raise ModelError(f"reconstruction unit {name!r} ({type(mod).__name__}) is called with {got}; "
                                 "mergeq reconstructs units that take one tensor and return one tensor")
        return hook

    hooks = [by_name[n].register_forward_hook(check(n), with_kwargs=True) for n in by_name]
    try:
        order = call_order(model, list(by_name), example_input)
    finally:
        for h in hooks:
            h.remove()
    for i, n in enumerate(order):
        last_of_adapter = i == len(order) - 1 and isinstance(model, LogitsAdapter)
        if not calls[n][0] and not last_of_adapter:
            raise ModelError(f"reconstruction unit {n!r} ({type(by_name[n]).__name__}) returns {calls[n][1]}; "
                             "mergeq reconstructs units that return one tensor (a model's last unit may return a "
                             "dict or tuple when an output selector picks the logits: model.output in a config, "
                             "nn.output.LogitsAdapter in Python)")
    return [(n, by_name[n]) for n in order]
