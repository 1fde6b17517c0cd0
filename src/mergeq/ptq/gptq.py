"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Alg. 1), layer by layer for every Conv2d/Linear of a prepared model.

A layer's weight is a matrix W [out, n] (a Conv2d's [out, in/groups, kh, kw] flattened; its
inputs unfolded with F.unfold into patch rows; a Linear's leading input dims flattened, so
[B, T, D] inputs work). With the layer's inputs X [n, N] GPTQ minimises ‖W X − Ŵ X‖² over
on-grid Ŵ:

    H = 2 X Xᵀ / N                       accumulated (float64) over calibration batches
    dead inputs (H_ii = 0): H_ii := 1, W[:, i] := 0          (as in the reference code)
    H += λ I,   λ = percdamp · mean(diag H)
    U = upper Cholesky factor of H⁻¹
    for column j in order (blocks of ``blocksize`` columns, lazy batch updates between blocks):
        q_j = clamp(round(w_j / Δ), −2^(b−1), 2^(b−1)−1) · Δ      Δ: the QuantModule's per-channel w_step
        e_j = (w_j − q_j) / U_jj ;   w_k −= e_j U_jk  for every later column k
    act_order: columns by descending diag(H), permuted back at the end.
    group_size g: every g columns (in processing order) get their own Δ per output row, searched
    (like the per-channel Δ, ``step_method``) on the group's columns of the error-updated W when
    the first of them is reached, as in the reference code; with act_order the groups follow
    the permuted order (the reference's default, not its ``static_groups``).

Grouped and depthwise convolutions (``groups`` = G > 1). Output row o of conv group
g = o // (out/G) multiplies only the patches X_g of its group's in/G input channels, so the
layer's error Σ_o ‖(w_o − ŵ_o) X_g(o)‖² splits into per-row terms with the Hessian
H_g = 2 X_g X_gᵀ / N of its own group. GPTQ's Alg. 1 already treats rows independently under
one shared H; with groups it runs once per conv group, on that group's rows and H_g (damped by
its own mean diagonal, dead inputs and act_order per group). Only the G diagonal blocks of
the full patch Gram matrix are accumulated ([G, n, n], n = in/G·kh·kw).

Choices. Sequential (default): the inputs of layer l come from the prepared model whose earlier
layers are already GPTQ-quantized (``sequential=False``: from the full-precision model). With
activation quantization configured, X is the input after the layer's calibrated activation
quantizer (what the layer multiplies); activation steps are not changed. Bias is kept. The arithmetic is float64; the result is cast back and lies exactly on the grid. Grouped
steps are stored per weight element (``QuantModule.w_step`` then has the weight's shape), so
every elementwise use of the step works unchanged; packed/ONNX export store them per group (mergeq.deploy.groups).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.prepare import StopForward, forward_batches
from ..nn.qmodule import QuantModule, quant_modules
from ..quant import qrange, search_weight_step
from ..registry import PTQ_METHODS
from .base import PTQContext

log = logging.getLogger(__name__)


@dataclass
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    group_size: int | None = None  # columns per step (None: one step per output channel)
    sequential: bool = True  # inputs from the partly quantized model (False: the FP model)
    capture_batch: int = 128  # batch size of the forward passes that collect H

    @classmethod
    def from_kwargs(cls, method: str, kwargs: dict, extra: tuple[str, ...] = ()) -> "GPTQOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{method} got unknown option(s) {unknown}; known: {sorted(known | set(extra))}")
        opts = cls(**kwargs)
        if opts.blocksize < 1 or opts.percdamp < 0 or opts.capture_batch < 1 or (opts.group_size is not None and opts.group_size < 1):
            raise ValueError(f"{method}: need blocksize >= 1, percdamp >= 0, capture_batch >= 1, "
                             f"group_size >= 1 or None; got {opts}")
        return opts


@torch.no_grad()
def gptq_quantize_matrix(W: torch.Tensor, H: torch.Tensor, step: torch.Tensor, bits: int, blocksize: int = 128,
                         percdamp: float = 0.01, act_order: bool = False, group_size: int | None = None,
                         step_method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``W`` [out, n] under the Hessian ``H`` [n, n]; ``step``: one Δ per row (or a scalar),
    replaced per group of ``group_size`` columns when that is given.

    Returns the on-grid values (integer codes · Δ) in ``W``'s dtype and the steps used: ``[out, 1]``
    per row, or ``[out, n]`` per element with ``group_size``."""
    out, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if step.numel() not in (1, out):
        raise ValueError(f"step needs one value per output row ({out}), got {step.numel()}")
    dtype, s, (lo, hi) = W.dtype, step.detach().reshape(-1).to(torch.float64).expand(out), qrange(bits, True)
    W, H = W.detach().to(torch.float64).clone(), H.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("GPTQ: H is not positive definite; increase percdamp")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q, S = torch.zeros_like(W), s[:, None].expand(out, n).clone()
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and j % group_size == 0:
                s = search_weight_step(W[:, j : j + group_size], bits, step_method)[:, 0]
                S[:, j : j + group_size] = s[:, None]
            Q[:, j] = q = torch.clamp(torch.round(W1[:, i] / s), lo, hi)
            E1[:, i] = e = (W1[:, i] - q * s) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, S = Q[:, inv], S[:, inv]
    S = S.to(dtype) if group_size else S[:, :1].to(dtype)
    return Q.to(dtype) * S, S


def conv_groups(qm: QuantModule) -> int:
    return qm.conv_kwargs["groups"] if qm.kind == "conv" else 1


def layer_rows(qm: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """The inputs ``qm`` multiplies, as rows [N, G·n] (G conv groups as consecutive column blocks
    of n, each matching ``qm.weight.reshape(out, -1)``; G = 1 for a Linear or ungrouped conv)."""
    if qm.act_quant is not None and qm.quant_act:
        x = qm.act_quant(x)
    if qm.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    kw = qm.conv_kwargs
    x = F.unfold(x, qm.weight.shape[2:], dilation=kw["dilation"], padding=kw["padding"], stride=kw["stride"])
    return x.transpose(1, 2).reshape(-1, x.shape[1])


@torch.no_grad()
def input_hessian(model: nn.Module, name: str, qm: QuantModule, data: torch.Tensor, bs: int, device) -> torch.Tensor:
    """H = 2 X Xᵀ / N of the inputs submodule ``name`` of ``model`` gets on ``data`` (first call per
    forward): [n, n], or [G, n, n] per conv group of a grouped conv (H_g, module docstring)."""
    n, groups = qm.weight[0].numel(), conv_groups(qm)
    shape = (n, n) if groups == 1 else (groups, n, n)
    acc = [torch.zeros(shape, dtype=torch.float64, device=device), 0]

    def hook(mod, args):
        X = layer_rows(qm, args[0]).to(torch.float64)
        if groups == 1:
            acc[0] += X.T @ X
        else:
            Xg = X.reshape(len(X), groups, n)
            acc[0] += torch.einsum("ngi,ngj->gij", Xg, Xg)
        acc[1] += X.shape[0]
        raise StopForward

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        forward_batches(model, data, bs, device)
    finally:
        h.remove()
    if acc[1] == 0:
        raise RuntimeError(f"layer {name!r} was not called by the model's forward")
    return 2.0 * acc[0] / acc[1]


@torch.no_grad()
def layer_order(qmodel: nn.Module, example: torch.Tensor) -> list[tuple[str, QuantModule]]:
    """QuantModules in execution order; layers the forward never calls are left out (they stay RTN)."""
    mods, order = quant_modules(qmodel), []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
             for n, m in mods]
    try:
        qmodel.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    if len(order) < len(mods):
        log.warning("GPTQ: layers the forward never calls stay round-to-nearest: %s", sorted(set(dict(mods)) - set(order)))
    return [(n, qmodel.get_submodule(n)) for n in order]


def group_rows(out: int, groups: int) -> list[slice]:
    """The output rows of each conv group (``out / groups`` consecutive rows each)."""
    rows = out // groups
    return [slice(g * rows, (g + 1) * rows) for g in range(groups)]


def quantize_layer(qm: QuantModule, H: torch.Tensor, opts: GPTQOptions, W: torch.Tensor | None = None,
                   step_method: str = "mse") -> None:
    """Set ``qm.weight`` to GPTQ's on-grid result for ``W`` (default: the current weight) under ``H``
    ([n, n], or [G, n, n]: conv group g's rows under H[g]); with ``opts.group_size``, ``qm.w_step``
    becomes the per-element grouped steps."""
    W = qm.weight.detach().reshape(qm.weight.shape[0], -1) if W is None else W
    if qm.w_step.numel() != W.shape[0]:
        raise ValueError(f"GPTQ starts from one step per output channel, got w_step of shape {tuple(qm.w_step.shape)}")
    Hs, step = (H[None] if H.dim() == 2 else H), qm.w_step.reshape(-1)
    parts = [gptq_quantize_matrix(W[rows], Hg, step[rows], qm.w_bits, opts.blocksize, opts.percdamp, opts.act_order,
                                  opts.group_size, step_method)
             for rows, Hg in zip(group_rows(W.shape[0], len(Hs)), Hs)]
    Wq, S = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    qm.weight.data = Wq.reshape(qm.weight.shape).to(qm.weight.dtype)
    if opts.group_size:
        qm.w_step = S.reshape(qm.weight.shape).to(qm.w_step.dtype)


@PTQ_METHODS.register("gptq", options=GPTQOptions)
def gptq(qmodel: nn.Module, ctx: PTQContext) -> None:
    opts = GPTQOptions.from_kwargs("gptq", ctx.options)
    qmodel.eval().requires_grad_(False)
    layers = layer_order(qmodel, ctx.calib[:2].to(ctx.device))
    if ctx.progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="gptq", unit="layer", disable=None)
    for name, m in layers:
        src = qmodel if opts.sequential else ctx.fp_model
        quantize_layer(m, input_hessian(src, name, m, ctx.calib, opts.capture_batch, ctx.device), opts,
                       step_method=ctx.config.step_method)
