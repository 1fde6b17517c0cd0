"""BatchNorm folding (Jacob et al., 2018; used by HDRQ Sec. 5 before quantization).

For y = γ (conv(x) - μ) / sqrt(σ² + ε) + β with conv weight W and bias b:
    W' = W · γ / sqrt(σ² + ε)    (per output channel)
    b' = (b - μ) · γ / sqrt(σ² + ε) + β
The BatchNorm is replaced by ``nn.Identity``. In eval mode the folded model equals the
original up to float rounding.

Pairing rule: with an example input, a BatchNorm is folded into the Conv2d/Linear whose output
tensor is exactly the BatchNorm's input (found with forward hooks, so it works on any module
tree). Without one, a BatchNorm is folded into the Conv2d/Linear registered just before it
in the same parent (the BRECQ/QDrop rule).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv2d, nn.Linear)


def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer`` in place (``layer`` gains a bias if it had none)."""
    if layer.weight.shape[0] != bn.num_features:
        raise ValueError(
            f"cannot fold BatchNorm with {bn.num_features} features into a layer with "
            f"{layer.weight.shape[0]} output channels"
        )
    with torch.no_grad():
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        scale = gamma / torch.sqrt(bn.running_var + bn.eps)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.mul_(scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        new_bias = (bias - bn.running_mean) * scale + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.clone())
        else:
            layer.bias.copy_(new_bias)


def _pairs_by_trace(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _LAYERS):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(id(o), n)))
        elif isinstance(mod, _BN):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, i, n=name: pairs.append((outputs[id(i[0])], n)) if id(i[0]) in outputs else None
                )
            )
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        prev = None
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, _BN) and prev is not None:
                pairs.append((prev, full))
            prev = full if isinstance(child, _LAYERS) else None
    return pairs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def fold_bn(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """Return a copy of ``model`` (in eval mode) with every foldable BatchNorm folded away."""
    model = copy.deepcopy(model).eval()
    pairs = _pairs_by_trace(model, example_input) if example_input is not None else _pairs_by_order(model)
    for layer_name, bn_name in pairs:
        fold_bn_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        set_module(model, bn_name, nn.Identity())
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())
