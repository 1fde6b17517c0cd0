"""Tracing a model for export: ``torch.fx`` with QuantModules kept as leaves, plus what two
example batches (of 2 and 3 images) show about every node: a tensor's shape, or the value of a
shape computation such as ``b, t, d = x.shape``. A dimension that differs between the two
batches depends on the batch size; every other one is static, which is how reshapes, views and
expands become ONNX ops with constant targets (``-1`` or the runtime batch where needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from ..nn.qmodule import QuantModule
from .pack import ExportError

EXAMPLE_BATCHES = (2, 3)
EXAMPLE_SIZES = (32, 16, 28, 64, 224)  # symbolic spatial dims: the first size the model runs at


class Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` whose QuantModules are single ``call_module`` nodes."""
    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        raise ExportError(f"torch.fx cannot trace {type(model).__name__}: {e}") from None
    return fx.GraphModule(model, graph)


@dataclass(frozen=True)
class Facts:
    """A node's value at the two example batch sizes (tensors as their ``torch.Size``)."""

    values: tuple[Any, Any]
    is_tensor: bool

    def batch_dims(self) -> list[int]:
        a, b = self.values
        return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]

    def reshape_target(self, what: str) -> list[int]:
        """The tensor's shape with ``-1`` for its one batch-dependent dimension (if any)."""
        dims = self.batch_dims()
        if len(dims) > 1:
            raise ExportError(f"{what}: more than one dimension depends on the batch size {self.values}")
        return [-1 if i in dims else int(s) for i, s in enumerate(self.values[0])]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        tensor = isinstance(out, torch.Tensor)
        self.seen[n.name] = (tensor, out.shape if tensor else out)
        return out


def _run(gm: fx.GraphModule, dims: list[int], device: torch.device) -> dict[str, Any]:
    rec = _Recorder(gm)
    rec.run(torch.randn(*dims, generator=torch.Generator().manual_seed(0)).to(device))
    return rec.seen


@torch.no_grad()
def node_facts(gm: fx.GraphModule, input_shape: Sequence[int | str]) -> dict[str, Facts]:
    """:class:`Facts` of every node, from forward passes on two example batches (symbolic
    spatial dimensions at the first of ``EXAMPLE_SIZES`` the model runs at)."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    gm.eval()
    symbolic = any(not isinstance(d, int) for d in input_shape[1:])
    error = None
    for size in EXAMPLE_SIZES if symbolic else EXAMPLE_SIZES[:1]:
        dims = [d if isinstance(d, int) else size for d in input_shape[1:]]
        try:
            runs = [_run(gm, [batch, *dims], device) for batch in EXAMPLE_BATCHES]
            break
        except ExportError:
            raise
        except Exception as e:  # the model's own error for an input it does not take
            error = e
    else:
        raise ExportError(f"the model does not run on an example input of shape {list(input_shape)}: {error}; "
                          "pass input_shape") from None
    return {name: Facts((v, runs[1][name][1]), tensor) for name, (tensor, v) in runs[0].items()}
