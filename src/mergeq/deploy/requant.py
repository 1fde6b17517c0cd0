"""The evaluated model is the deployed model: the integer graph's requantizations in PyTorch.

Between its integer layers the ``int8`` export keeps every tensor on an 8-bit grid
(:mod:`.integer`): a convolution's output requantized with QLinearConv (its float bias first
rounded to int32 accumulator units), a residual add's output with QLinearAdd. The fake-quant
model that PTQ builds rounds only each layer's input, so where a tensor feeds a residual add or
several readers the two models differ: an 8-bit rounding of the skip path and of the sum, and a
second rounding where a ``b``-bit layer reads an 8-bit tensor. Measured before this module
(RESULTS §8): the integer file predicted the class the evaluated model predicted on 96.1-96.8%
of the test images at W4A4 and 99.1-99.6% at W8A8.

:func:`deployed` gives the model that the integer export computes, as a fake-quant model (MQBench's
principle: quantize in simulation exactly where the deployed graph quantizes): a copy of the
model whose integer convolutions round their bias to accumulator units and whose outputs, and
the outputs of the modules that end in a requantized add, are rounded to the plan's 8-bit grid
(forward hooks; straight-through gradients). It differs from :class:`.integer.IntegerSimulation`
(the kernels' exact arithmetic, float64) only by float32 rounding, like the QDQ form; mergeq
evaluates and reports this model (``run``, ``compare``, ``quantize``, ``merge``, ``pmq``) and
``export`` checks the file against it.

Why not the other way round (keep sums wide, so the integer graph rounds nothing twice)? The
only float-output integer convolution in onnxruntime is ConvInteger, 8-23x slower than
QLinearConv and 3.6-6.5x slower than the float Conv (AMD EPYC, batch 64, one thread, 16-64
channels; ``benchmarks/requant_kernels.py``, PERFORMANCE.md §8), which would make the integer
model slower than FP32.

An add that no module returns (its sum used inside a module that goes on computing) cannot be
hooked: :func:`modelable_adds` finds the adds that can, and :func:`~.integer.plan_integer` keeps
the others in float (the consuming layers quantize the float sum, as the fake-quant model does).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..nn.qmodule import QuantModule
from .pack import ExportError

PLAN_ATTR = "integer_plan"  # the plan a deployed model computes (an IntegerPlan), on the model


class Requantize:
    """Forward hook: the module's output rounded to ``grid`` (its uint8 codes' values), with a
    straight-through gradient; the arithmetic of ``Grid.quantize`` then ``Grid.dequantize``."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.lo, self.hi = grid.lo - grid.zero_point, grid.hi - grid.zero_point

    def __call__(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"{type(module).__name__} returns {type(out).__name__}, not the tensor the integer "
                              "plan requantizes")
        q = torch.clamp(torch.round(out / self.grid.scale), self.lo, self.hi) * self.grid.scale
        return out + (q - out).detach()


def _scope_outputs(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The nodes computed inside module ``path`` (one call of it) whose value leaves it."""
    inside = {n for n in gm.graph.nodes if path in (n.meta.get("nn_module_stack") or {})}
    return [n for n in inside if any(u not in inside for u in n.users)]


def add_site(gm: fx.GraphModule, roles: Any, n: fx.Node) -> str | None:
    """The path of the innermost module whose one output is add ``n``'s value (possibly through its
    fused ReLU and pass-through modules), or ``None`` where no module returns it."""
    stack = list((n.meta.get("nn_module_stack") or {}).keys())
    again = {k.split("@")[0] for m in gm.graph.nodes for k in (m.meta.get("nn_module_stack") or {}) if "@" in k}
    for path in reversed(stack):
        if path.split("@")[0] in again:  # a module called more than once: a hook would fire at every call
            return None
        outs = _scope_outputs(gm, path)
        if len(outs) == 1 and roles.source(outs[0]) is n:
            return path
        if len(outs) > 1 or outs and roles.source(outs[0]) is not n:
            return None  # the add is not this module's result, so not any enclosing module's either
    return None


def modelable_adds(gm: fx.GraphModule, roles: Any, adds: list[fx.Node]) -> set[fx.Node]:
    """The adds of ``adds`` whose output a module hook can requantize (:func:`add_site`)."""
    return {n for n in adds if add_site(gm, roles, n) is not None}


def accumulator_bias(m: QuantModule, scale: np.ndarray) -> torch.Tensor:
    """The float bias as QLinearConv adds it: ``rne(b / (s_x s_w))`` accumulator units, times the unit."""
    b = m.bias.detach().cpu().double().numpy()
    info = np.iinfo(np.int32)
    units = np.clip(np.rint(b / scale.astype(np.float64)), info.min, info.max)
    return torch.from_numpy((units * scale.astype(np.float64)).astype(np.float32))


def deployed(model: nn.Module, plan: Any) -> nn.Module:
    """A copy of ``model`` that computes what its ``kernels="int8"`` export with ``plan`` computes
    (module docstring); ``model`` itself is not changed. The plan is kept on the copy
    (``integer_plan``) for ``export`` and checkpoints."""
    from .integer import Grid, _Roles, accumulator_scale
    from .trace import node_facts, trace

    out = copy.deepcopy(model).eval()
    setattr(out, PLAN_ATTR, plan)
    if not plan.grids:
        return out
    gm = trace(model.eval())
    roles = _Roles(gm, node_facts(gm, plan.input_shape))
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for n in gm.graph.nodes:
        if n.name not in plan.grids or not roles.is_producer(n):
            continue
        grid = plan.grids[n.name]
        if roles.kind(n) == "layer":
            if calls[n.target] > 1:
                raise ExportError(f"layer {n.target} is called {calls[n.target]} times: the integer plan's "
                                  "requantization of its output cannot be modelled per call")
            m = out.get_submodule(n.target)
            if m.bias is not None:
                m.bias.data = accumulator_bias(m, accumulator_scale(m, Grid.of(m.act_quant))).to(m.bias.device)
            m.register_forward_hook(Requantize(grid))
        else:
            site = add_site(gm, roles, n)
            if site is None:
                raise ExportError(f"the integer plan requantizes add {n.name}, which no module returns; "
                                  "plan it with plan_integer (it keeps such adds in float)")
            out.get_submodule(site).register_forward_hook(Requantize(grid))
    return out


def plan_of(model: nn.Module) -> Any:
    """The integer plan a :func:`deployed` model computes, or ``None``."""
    return getattr(model, PLAN_ATTR, None)
