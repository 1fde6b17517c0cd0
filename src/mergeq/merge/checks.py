"""Checks that a list of models can be merged; each failure names the offending entry."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import IncompatibleModelsError
from ..nn.qmodule import QuantModule


def check_mergeable(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Same architecture (module tree and classes), same tensor names and shapes, same bit widths;
    errors call the models ``names`` (default ``model 0``, ``model 1``, ...)."""
    if len(models) < 1:
        raise IncompatibleModelsError("merge needs at least one model, got none")
    names = list(names) if names is not None else [f"model {k}" for k in range(len(models))]
    ref, first = models[0], names[0]
    ref_types = [(n, type(m).__name__) for n, m in ref.named_modules()]
    ref_sd = ref.state_dict()
    for model, k in zip(models[1:], names[1:]):
        types = [(n, type(m).__name__) for n, m in model.named_modules()]
        if types != ref_types:
            diff = next((a, b) for a, b in zip(ref_types + [None], types + [None]) if a != b)
            raise IncompatibleModelsError(
                f"{k} has a different architecture from {first}: module {diff[1]} where {diff[0]} was expected"
            )
        sd = model.state_dict()
        for key, t in ref_sd.items():
            if key not in sd:
                raise IncompatibleModelsError(f"{k} lacks tensor {key!r} that {first} has")
            if sd[key].shape != t.shape:
                raise IncompatibleModelsError(
                    f"{k} tensor {key!r} has shape {tuple(sd[key].shape)}, {first} has {tuple(t.shape)}"
                )
        for (name, a), (_, b) in zip(_qmods(ref), _qmods(model)):
            if (a.w_bits, a.a_bits) != (b.w_bits, b.a_bits):
                raise IncompatibleModelsError(
                    f"{k} layer {name!r} is W{b.w_bits}A{b.a_bits}, {first} has W{a.w_bits}A{a.a_bits}"
                )


def _qmods(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
