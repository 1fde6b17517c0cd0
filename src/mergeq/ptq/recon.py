"""The one reconstruction loop shared by AdaRound, BRECQ, QDrop and HDRQ.

For each unit F (nn.blocks.partition) in execution order, minimise (BRECQ, Li et al. 2021, Eq. 7)

    E ‖F_fp(x_fp) - F_q(x̃)‖²,   x̃ = Q(x_q)              (BRECQ)
                                x̃ = m ⊙ x_fp + (1-m) ⊙ Q(x_q),  m ~ Bernoulli(p)   (QDrop, Wei et al. 2022)

where x_fp is the unit input in the full-precision model, x_q the input produced by the
already reconstructed (and hardened) preceding units and Q the input's activation quantizer.
Placement: QDrop's code quantizes activations at a block's output, so a block's input arrives
quantized and is mixed with x_fp once. Here the quantizer sits at each layer's input, inside
the unit; the layers that read the unit input receive x_fp as their quantizer's drop
alternative (one mask shared by them), so the unit sees exactly QDrop's per-element choice of
x_fp or Q(x_q), each input element dropped once. Quantizers deeper in the unit drop their own
input as in QDrop (ActQuantizer.drop_prob). A unit whose input reaches no quantizer directly
(a LayerNorm first) mixes x_fp and x_q at its input instead. The squared error is summed over
channels and averaged over batch and positions, as in the BRECQ/QDrop code. Unit inputs and
the FP outputs are captured once per unit with forward hooks over the calibration set (kept
on CPU: three tensors of at most the calibration set's size each).

Methods plug in through :class:`ReconHooks` (which w_quantizer to install, which weight
parameters to train, the lr schedule, a phase switch per step, extra loss terms on the layers
or on the unit's input and output, hardening).
Activation steps are learned with Adam + cosine annealing (LSQ, lr 4e-5 as in BRECQ/QDrop).
A CPU run is reproducible bit for bit: unit k reseeds torch with ``ctx.seed + k``.

Cost (docs/PERFORMANCE.md): autograd tracks only the tensors that train (the unit is frozen
first); a step's QDrop masks are drawn once, and a second pass in the same step (TTAQ's
perturbed pass) gets them as they are (quant.fakequant.record_masks / replay_masks); AdaRound's
soft weights are one node per unit and step (ptq.adaround.SoftRoundGroup). Each gives the
same numbers as the straightforward computation (tests/test_recon_speed.py). On a CUDA device
each step is replayed as one CUDA graph per phase of the hooks (ptq.graphs; option
``cuda_graphs``): the learning rates and the schedules' scalars are then device tensors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import partition
from ..nn.output import LogitsAdapter, select_logits
from ..nn.prepare import StopForward, forward_batches
from ..nn.qmodule import QuantModule, quant_modules
from ..quant.fakequant import bernoulli_mask, record_masks, replay_masks
from .base import PTQContext
from .graphs import StepGraphs, StepScalars

log = logging.getLogger(__name__)
Layers = list[tuple[str, QuantModule]]


@dataclass
class ReconOptions:
    iters: int = 20000  # optimisation steps per unit
    batch_size: int = 32
    lr: float = 1e-3  # weight-side learning rate (AdaRound V, HDRQ weights)
    act_lr: float = 4e-5  # LSQ activation steps
    drop_prob: float = 0.0  # QDrop: probability of keeping the FP value (0 = BRECQ)
    capture_batch: int = 128  # batch size of the forward passes that cache unit inputs
    cuda_graphs: bool = True  # on a CUDA device: each step replayed as one CUDA graph (ptq.graphs)

    @classmethod
    def from_kwargs(cls, method: str, kwargs: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{method} got unknown option(s) {unknown}; known options: {sorted(known)}")
        opts = cls(**kwargs)
        if opts.iters < 1 or opts.batch_size < 1 or not 0.0 <= opts.drop_prob <= 1.0:
            raise ValueError(f"{method}: need iters >= 1, batch_size >= 1, 0 <= drop_prob <= 1; got {opts}")
        return opts


class ReconHooks:
    """Customisation points of :func:`reconstruct`; the defaults train nothing on the weight side."""

    learn_act = True  # train the unit's activation steps (LSQ)
    quant_act = True  # activations quantized during reconstruction (False: weight-only)
    # per-step scalars (floats; 0-dim device tensors in a graphed step): set by the loop before setup
    scalars: StepScalars = StepScalars(torch.device("cpu"), graphed=False)
    # True when every value the step reads that changes between steps comes from ``scalars`` and
    # every change of its code from ``phase``: only then may a CUDA device replay the step as a graph
    # (a Python float read by a replayed step would keep its captured value)
    graph_safe = False

    def setup(self, layers: Layers) -> list[nn.Parameter]:
        """Install w_quantizers on the unit's layers; return the weight-side parameters to train."""
        return []

    def lr_factor(self, t: int, iters: int) -> float:
        """Multiplier of the weight-side learning rate at step ``t`` (default: constant)."""
        return 1.0

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        """Called before step ``t`` (schedules, phase switches). A scalar the step reads that
        changes from step to step comes from ``self.scalars(name, value)``."""

    def phase(self, t: int, iters: int) -> Hashable:
        """What decides the code of step ``t`` (after :meth:`on_step`): a graphed loop captures one
        graph per phase. :meth:`penalty` and :meth:`unit_loss` may depend on ``t`` only through it
        (default: one phase)."""
        return None

    def penalty(self, t: int, iters: int, layers: Layers) -> torch.Tensor | float:
        """Extra loss term added to the reconstruction error at step ``t``."""
        return 0.0

    def unit_loss(self, t: int, iters: int, forward, x: torch.Tensor, x_fp: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor | float:
        """Extra loss term that needs the unit itself (TTAQ's PCR): ``forward(x, x_fp)`` runs the
        unit as the step does (QDrop's input rule included) and gave ``out`` for this step's
        inputs ``x`` (quantized path) and ``x_fp`` (None when the unit does not drop). A second
        call within the step reuses the first call's QDrop masks (inputs of the same shapes) and
        the step's soft AdaRound weights. The default adds nothing."""
        return 0.0

    def finish(self, layers: Layers) -> None:
        """Harden the unit so later units see its final (deterministic) quantized output."""


@torch.no_grad()
def capture(model: nn.Module, name: str, calib: torch.Tensor, bs: int, device, output: bool,
            select: str | int | None = None):
    """Inputs (and outputs, through the logits selector ``select`` if given) of submodule ``name``
    over ``calib``, concatenated on CPU."""
    unit = model.get_submodule(name) if name else model
    ins, outs = [], []

    def hook(mod, args, out=None):
        if output and select is not None:
            out = select_logits(out, select)
        if len(args) != 1 or not torch.is_tensor(args[0]) or (output and not torch.is_tensor(out)):
            raise TypeError(f"reconstruction unit {name!r} must map one tensor to one tensor")
        ins.append(args[0].detach().cpu())
        if output:
            outs.append(out.detach().cpu())
        raise StopForward

    h = unit.register_forward_hook(hook) if output else unit.register_forward_pre_hook(hook)
    try:
        forward_batches(model, calib, bs, device)
    finally:
        h.remove()
    if len(ins) != -(-len(calib) // bs):
        raise RuntimeError(f"reconstruction unit {name!r} was not called by the model's forward")
    return torch.cat(ins), (torch.cat(outs) if output else None)


def rec_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """‖pred - tgt‖² summed over channels (dim 1), averaged over the rest (BRECQ's lp_loss, p=2),
    computed as one fused sum of squares."""
    return F.mse_loss(pred, tgt, reduction="sum") * (pred.shape[1] / pred.numel())


class UnitBatches:
    """Random mini-batches (drawn with replacement, as in BRECQ/QDrop) of a unit's cached
    (x_q, x_fp, y_fp), gathered with ``index_select`` into buffers reused every step.

    On the CPU the tensors stay where they are. On another device they move there once when
    they fit in a quarter of its free memory (indices are then drawn on the device); otherwise
    they stay in pinned host memory and each batch is copied asynchronously through two
    alternating pinned buffers, so the step never waits on a host-device synchronisation.
    """

    def __init__(self, data: tuple[torch.Tensor, ...], batch_size: int, device: torch.device) -> None:
        self.n, self.bs, self.device = len(data[0]), min(batch_size, len(data[0])), device
        nbytes = sum(t.numel() * t.element_size() for t in data)
        if device.type == "cpu" or nbytes < _free_memory(device) // 4:
            self.src, self.staged = [t.to(device) for t in data], False
            self.bufs = [[t.new_empty((self.bs, *t.shape[1:]))] for t in self.src]
        else:
            self.src, self.staged = [t.pin_memory() for t in data], True
            self.bufs = [[t.new_empty((self.bs, *t.shape[1:])).pin_memory() for _ in range(2)] for t in data]
            self.dev = [torch.empty((self.bs, *t.shape[1:]), dtype=t.dtype, device=device) for t in data]
            self.done = [None, None]
        self.k = 0

    def next(self) -> list[torch.Tensor]:
        """One batch of each tensor, the same rows; valid until the next call."""
        if not self.staged:
            idx = torch.randint(self.n, (self.bs,), device=self.src[0].device)
            return [torch.index_select(t, 0, idx, out=b[0]) for t, b in zip(self.src, self.bufs)]
        slot, self.k = self.k, self.k ^ 1
        if self.done[slot] is not None:
            self.done[slot].synchronize()  # the copy from this pinned buffer two steps ago
        idx = torch.randint(self.n, (self.bs,))
        out = []
        for t, b, d in zip(self.src, self.bufs, self.dev):
            torch.index_select(t, 0, idx, out=b[slot])
            out.append(d.copy_(b[slot], non_blocking=True))
        self.done[slot] = torch.cuda.Event() if self.device.type == "cuda" else None
        if self.done[slot] is not None:
            self.done[slot].record()
        return out


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 1 << 62  # other accelerators: assume it fits


def _adam(groups: list[dict], capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over all trained tensors of a unit, one fused kernel per step where the device has it
    (``capturable``: its state on the device, for a step captured as a CUDA graph)."""
    try:
        return torch.optim.Adam(groups, fused=True, capturable=capturable)
    except RuntimeError:
        return torch.optim.Adam(groups, capturable=capturable)


def input_layers(unit: nn.Module, layers: Layers, x: torch.Tensor) -> list[QuantModule]:
    """The layers of ``unit`` that receive the unit's input tensor itself (found with one forward)."""
    hit: list[QuantModule] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: hit.append(mod) if args and args[0] is x else None)
             for _, m in layers]
    try:
        with torch.no_grad():
            unit(x)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(hit))


@torch.enable_grad()
def reconstruct_unit(unit: nn.Module, layers: Layers, data, hooks: ReconHooks, opts: ReconOptions, device) -> float:
    device = torch.device(device)
    entry = input_layers(unit, layers, data[0][:2].to(device))  # before setup: draws no random numbers
    unit.requires_grad_(False)  # autograd tracks only what trains (no gradients of frozen biases, say)
    acts = [m.act_quant for _, m in layers if m.act_quant is not None and hooks.quant_act]
    p_drop = opts.drop_prob if acts else 0.0
    x_q, x_fp_all, y_fp = data  # x_fp is read only by QDrop's input rule
    batches = UnitBatches((x_q, x_fp_all, y_fp) if p_drop > 0 else (x_q, y_fp), opts.batch_size, device)
    graphed = opts.cuda_graphs and hooks.graph_safe and device.type == "cuda" and not batches.staged
    hooks.scalars = scalars = StepScalars(device, graphed)
    w_params = hooks.setup(layers)
    for _, m in layers:
        m.quant_act = hooks.quant_act
    a_params = [q.step for q in acts] if hooks.learn_act else []
    for p in w_params + a_params:
        p.requires_grad_(True)
    groups = ([{"params": w_params, "lr": scalars("lr_w", opts.lr), "kind": "w"}] if w_params else []) + \
             ([{"params": a_params, "lr": scalars("lr_a", opts.act_lr), "kind": "a"}] if a_params else [])
    opt = _adam(groups, capturable=graphed) if groups else None
    entry = [m.act_quant for m in entry if m.act_quant is not None and m.act_quant in acts]
    for q in acts:
        q.train()
        q.drop_prob = p_drop

    step_masks: list[list[torch.Tensor]] = []  # the QDrop masks of this step's first pass

    def forward(x: torch.Tensor, x_fp: torch.Tensor) -> torch.Tensor:
        """The unit on x_q, where QDrop's input rule applies: each element of the input is x_fp
        with probability p, else the quantized x_q (one mask shared by the layers reading it).
        A second pass within the step (TTAQ's perturbed pass) gets the first pass's masks."""
        if p_drop == 0:
            return unit(x)
        if step_masks:
            with replay_masks(step_masks[0]):
                return _forward(x, x_fp)
        with record_masks() as drawn:
            out = _forward(x, x_fp)
        step_masks.append(drawn)
        return out

    def _forward(x: torch.Tensor, x_fp: torch.Tensor) -> torch.Tensor:
        keep = bernoulli_mask(x, p_drop)
        if entry:
            for q in entry:
                q.fp_input = (keep, x_fp)
        else:  # no quantizer reads the input directly (e.g. a LayerNorm first): mix it here
            x = torch.lerp(x, x_fp, keep)
        return unit(x)

    def step() -> torch.Tensor:
        """One step after ``hooks.on_step``: a batch, the loss, its gradients, Adam (a graphed loop
        records it once per phase and replays it)."""
        if p_drop > 0:
            x, x_fp, y = batches.next()
        else:
            (x, y), x_fp = batches.next(), None
        step_masks.clear()
        out = forward(x, x_fp)
        loss = rec_loss(out, y)
        for extra in (hooks.penalty(t, opts.iters, layers), hooks.unit_loss(t, opts.iters, forward, x, x_fp, out)):
            if not (isinstance(extra, float) and extra == 0.0):  # a term that is 0.0 adds no node
                loss = loss + extra
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach()

    graphs = StepGraphs(device, graphed and opt is not None, name=layers[0][0] if layers else "")
    loss = torch.tensor(float("nan"))
    for t in range(opts.iters):
        hooks.on_step(t, opts.iters, layers)
        if opt is not None:
            for g in opt.param_groups:  # LambdaLR / CosineAnnealingLR(eta_min=0) in closed form
                g["lr"] = scalars("lr_w", opts.lr * hooks.lr_factor(t, opts.iters)) if g["kind"] == "w" else \
                    scalars("lr_a", opts.act_lr * 0.5 * (1.0 + math.cos(math.pi * t / opts.iters)))
        loss = graphs(hooks.phase(t, opts.iters), step)
    step_masks.clear()
    for q in acts:
        q.eval()
        q.drop_prob, q.fp_input = 0.0, None
    for _, m in layers:
        m.quant_act = True
    hooks.finish(layers)
    hooks.scalars = ReconHooks.scalars
    unit.requires_grad_(False)
    return float(loss)


@torch.no_grad()
def hardened_error(unit: nn.Module, x_q: torch.Tensor, y_fp: torch.Tensor, bs: int, device) -> float:
    """rec_loss of the finished (hardened, deterministic) unit over all cached calibration inputs."""
    unit.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync, at the end
    for i in range(0, len(x_q), bs):
        total += rec_loss(unit(x_q[i : i + bs].to(device)), y_fp[i : i + bs].to(device)).double() * len(x_q[i : i + bs])
    return float(total) / len(x_q)


def reconstruct(qmodel: nn.Module, ctx: PTQContext, hooks: ReconHooks, opts: ReconOptions,
                layerwise: bool = False) -> None:
    """Reconstruct every unit of ``qmodel`` in order (in place)."""
    calib, device = ctx.calib, ctx.device
    qmodel.eval().requires_grad_(False)
    units = partition(qmodel, calib[:2].to(device), layerwise=layerwise)
    # the last unit of a LogitsAdapter may return the dict / tuple its selector reads: compare logits
    last_select = qmodel.select if isinstance(qmodel, LogitsAdapter) else None
    it = units
    if ctx.progress:
        from tqdm.auto import tqdm

        it = tqdm(units, desc="reconstruction", unit="unit", disable=None)
    for k, (name, unit) in enumerate(it):
        torch.manual_seed(ctx.seed + k)
        select = last_select if k == len(units) - 1 else None
        x_q, _ = capture(qmodel, name, calib, opts.capture_batch, device, output=False)
        x_fp, y_fp = capture(ctx.fp_model, name, calib, opts.capture_batch, device, output=True, select=select)
        layers = [(f"{name}.{n}" if n and name else n or name, m) for n, m in quant_modules(unit)]
        run = unit if select is None else LogitsAdapter(unit, select)
        loss = reconstruct_unit(run, layers, (x_q, x_fp, y_fp), hooks, opts, device)
        err = hardened_error(run, x_q, y_fp, opts.capture_batch, device)
        ctx.report.setdefault("recon_loss", {})[name or "<model>"] = err
        log.info("unit %s (%d layers): last step's loss %.4g, reconstruction error after hardening %.4g",
                 name, len(layers), loss, err)
