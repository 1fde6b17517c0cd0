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

Units come back in execution order when an example input is given (traced with hooks; units
the forward never calls are dropped), else in registration order. Each unit must take one
tensor and return one tensor, which holds for the models above.
"""
from __future__ import annotations

import torch
from torch import nn

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
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if _n_quant(child) == 0:
            continue
        if isinstance(child, _LEAVES) or (not layerwise and is_block(child)):
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
    order = call_order(model, [n for n, _ in units], example_input)
    by_name = dict(units)
    return [(n, by_name[n]) for n in order]
