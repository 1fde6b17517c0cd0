"""The output adapter (logits selector): models whose forward returns a dict, a tuple or a
Hugging Face-style output object, used wherever mergeq needs logits.

mergeq reads a model's output as logits in ``evaluate``, SHOT, source training, TENT / ABL and
as the reconstruction target of a model's last unit. ``LogitsAdapter(model, select)`` wraps a
model so that its forward returns that tensor (``select_logits``); every other mergeq function
sees an ordinary ``nn.Module``. ``select``:

* ``"auto"``: an object with a tensor ``.logits`` attribute (``transformers``' ModelOutput,
  torchvision's ``InceptionOutputs`` / ``GoogLeNetOutputs`` in training mode); a mapping's
  ``"logits"`` entry, or its only tensor value; the first element of a tuple or list;
* a string: that mapping key or attribute;
* an integer: that element of a tuple or list.

A tensor output is returned as it is, whatever ``select``. The wrapped model is the adapter's
``model`` submodule (state-dict keys gain the prefix ``model.``), called with one input (the image
batch every mergeq function feeds), which lets ``torch.fx`` trace the adapter for ONNX export
(``deploy.trace``); ``nn.blocks.partition`` walks
into it as if it were the root, and the reconstruction of its last unit compares the selected
logits when that unit's own output is the dict / tuple.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from ..errors import ModelError


def describe_output(out) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


def _is_tensor(value) -> bool:
    """A tensor, or the ``torch.fx`` proxy of one (while the adapter is traced for export)."""
    return torch.is_tensor(value) or isinstance(value, fx.Proxy)


def select_logits(out, select: str | int = "auto") -> torch.Tensor:
    """The logits tensor in a model's output ``out`` (see the module docstring). Python-level
    selection, so ``torch.fx`` traces through it: the exported graph returns the logits only."""
    if _is_tensor(out):
        return out
    found = None
    if select == "auto":
        if _is_tensor(getattr(out, "logits", None)):
            found = out.logits
        elif isinstance(out, Mapping):
            tensors = [v for v in out.values() if _is_tensor(v)]
            found = out.get("logits", tensors[0] if len(tensors) == 1 else None)
        elif isinstance(out, (tuple, list)) and out:
            found = out[0]
    elif isinstance(select, str):
        found = out.get(select) if isinstance(out, Mapping) else getattr(out, select, None)
    elif isinstance(out, (tuple, list)) and -len(out) <= select < len(out):
        found = out[select]
    if not _is_tensor(found):
        raise ModelError(f"the model returned {describe_output(out)}: output selector {select!r} finds no logits "
                         "tensor there; set the model's output selector to the key, attribute or index of the logits")
    return found


def logits_like(out, n: int, num_classes: int) -> list:
    """Keys (a mapping) or indices (a tuple / list) of the items of ``out`` shaped ``n x num_classes``."""
    items = out.items() if isinstance(out, Mapping) else enumerate(out) if isinstance(out, (tuple, list)) else ()
    return [k for k, v in items if torch.is_tensor(v) and tuple(v.shape) == (n, num_classes)]


class LogitsAdapter(nn.Module):
    """``model`` whose forward returns ``select_logits(model(...), select)``."""

    def __init__(self, model: nn.Module, select: str | int = "auto") -> None:
        super().__init__()
        if isinstance(select, bool) or not isinstance(select, (str, int)):
            raise ModelError(f"output selector must be 'auto', a key / attribute name or an index, got {select!r}")
        self.model, self.select = model, select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_logits(self.model(x), self.select)

    def extra_repr(self) -> str:
        return f"select={self.select!r}"
