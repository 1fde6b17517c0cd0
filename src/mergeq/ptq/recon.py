"""The one reconstruction loop shared by AdaRound, BRECQ, QDrop and HDRQ.

For each unit F (nn.blocks.partition) in execution order, minimise (BRECQ, Li et al. 2021, Eq. 7)

    E ‖F_fp(x_fp) - F_q(x̃)‖²,   x̃ = x_q              (BRECQ)
                                x̃ = m ⊙ x_fp + (1-m) ⊙ x_q,  m ~ Bernoulli(p)   (QDrop, Wei et al. 2022)

where x_fp is the unit input in the full-precision model and x_q the input produced by the
already reconstructed (and hardened) preceding units. The squared error is summed over
channels and averaged over batch and positions, as in the BRECQ/QDrop code. Unit inputs and
the FP outputs are captured once per unit with forward hooks over the calibration set (kept
on CPU: three tensors of at most the calibration set's size each).

Methods plug in through :class:`ReconHooks` (which w_quantizer to install, which weight
parameters to train, the lr schedule, a phase switch per step, extra loss terms on the layers
or on the unit's input and output, hardening).
Activation steps are learned with Adam + cosine annealing (LSQ, lr 4e-5 as in BRECQ/QDrop).
A CPU run is reproducible bit for bit: unit k reseeds torch with ``ctx.seed + k``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..nn.blocks import partition
from ..nn.output import LogitsAdapter, select_logits
from ..nn.qmodule import QuantModule, quant_modules
from .base import PTQContext

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

    def setup(self, layers: Layers) -> list[nn.Parameter]:
        """Install w_quantizers on the unit's layers; return the weight-side parameters to train."""
        return []

    def scheduler(self, opt: torch.optim.Optimizer, iters: int):
        return None

    def on_step(self, t: int, iters: int, layers: Layers) -> None:
        """Called before step ``t`` (schedules, phase switches)."""

    def penalty(self, t: int, iters: int, layers: Layers) -> torch.Tensor | float:
        """Extra loss term added to the reconstruction error at step ``t``."""
        return 0.0

    def unit_loss(self, t: int, iters: int, unit: nn.Module, x: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor | float:
        """Extra loss term that needs the unit itself: ``x`` is the step's input batch (after QDrop
        mixing), ``out = unit(x)`` its quantized output (TTAQ's PCR). The default adds nothing."""
        return 0.0

    def finish(self, layers: Layers) -> None:
        """Harden the unit so later units see its final (deterministic) quantized output."""


class _Stop(Exception):
    pass


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
        raise _Stop

    h = unit.register_forward_hook(hook) if output else unit.register_forward_pre_hook(hook)
    try:
        model.eval()
        for i in range(0, len(calib), bs):
            try:
                model(calib[i : i + bs].to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    if len(ins) != -(-len(calib) // bs):
        raise RuntimeError(f"reconstruction unit {name!r} was not called by the model's forward")
    return torch.cat(ins), (torch.cat(outs) if output else None)


def rec_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """‖pred - tgt‖² summed over channels (dim 1), averaged over the rest (BRECQ's lp_loss, p=2)."""
    return (pred - tgt).pow(2).sum(1).mean()


@torch.enable_grad()
def reconstruct_unit(unit: nn.Module, layers: Layers, data, hooks: ReconHooks, opts: ReconOptions, device) -> float:
    x_q, x_fp, y_fp = data
    w_params = hooks.setup(layers)
    acts = [m.act_quant for _, m in layers if m.act_quant is not None and hooks.quant_act]
    for _, m in layers:
        m.quant_act = hooks.quant_act
    for p in w_params + [q.step for q in acts if hooks.learn_act]:
        p.requires_grad_(True)
    w_opt = torch.optim.Adam(w_params, lr=opts.lr) if w_params else None
    w_sched = hooks.scheduler(w_opt, opts.iters) if w_opt else None
    a_opt = torch.optim.Adam([q.step for q in acts], lr=opts.act_lr) if acts and hooks.learn_act else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=opts.iters, eta_min=0.0) if a_opt else None
    for q in acts:
        q.train()
        q.drop_prob = opts.drop_prob
    loss = torch.tensor(float("nan"))
    for t in range(opts.iters):
        hooks.on_step(t, opts.iters, layers)
        idx = torch.randint(len(x_q), (min(opts.batch_size, len(x_q)),))
        x = x_q[idx].to(device)
        if opts.drop_prob > 0:
            x = torch.where(torch.rand_like(x) < opts.drop_prob, x_fp[idx].to(device), x)
        out = unit(x)
        loss = rec_loss(out, y_fp[idx].to(device)) + hooks.penalty(t, opts.iters, layers)
        extra = hooks.unit_loss(t, opts.iters, unit, x, out)
        if not (isinstance(extra, float) and extra == 0.0):  # the default leaves the loss bit-identical
            loss = loss + extra
        for opt in (w_opt, a_opt):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt, sched in ((w_opt, w_sched), (a_opt, a_sched)):
            if opt is not None:
                opt.step()
                if sched is not None:
                    sched.step()
    for q in acts:
        q.eval()
        q.drop_prob = 0.0
    for _, m in layers:
        m.quant_act = True
    hooks.finish(layers)
    unit.requires_grad_(False)
    return float(loss.detach())


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

        it = tqdm(units, desc="reconstruction", unit="unit")
    for k, (name, unit) in enumerate(it):
        torch.manual_seed(ctx.seed + k)
        select = last_select if k == len(units) - 1 else None
        x_q, _ = capture(qmodel, name, calib, opts.capture_batch, device, output=False)
        x_fp, y_fp = capture(ctx.fp_model, name, calib, opts.capture_batch, device, output=True, select=select)
        layers = [(f"{name}.{n}" if n and name else n or name, m) for n, m in quant_modules(unit)]
        run = unit if select is None else LogitsAdapter(unit, select)
        loss = reconstruct_unit(run, layers, (x_q, x_fp, y_fp), hooks, opts, device)
        log.info("unit %s (%d layers): final loss %.4g", name, len(layers), loss)
