"""E-PMQ (expert-guided post-merge quantization: experts give the layer-wise calibration targets,
merged-weight anchoring keeps the merged behaviour), built on GPTQ (Frantar et al., 2023, Alg. 1;
see :mod:`mergeq.ptq.gptq`).

For each Conv2d/Linear layer l of the merged model, in execution order, with merged weight W_m,
expert weights W_k (k = 1..K, after the same BN folding) and the Gram matrices of its inputs

    G_k = 2 X_k X_kᵀ / N_k      X_k: inputs of layer l on expert k's own data D_k (``expert_calib[k]``)
    G_m = 2 X_m X_mᵀ / N_m      X_m: inputs of layer l on the calibration data given to ``quantize``

the expert-guided objective with merged-weight anchoring (weight μ = ``anchor`` ≥ 0)

    L(W) = Σ_k ‖W X_k − W_k X_k‖² / N_k  +  μ ‖W X_m − W_m X_m‖² / N_m
         = ½ tr((W − W*) H (W − W*)ᵀ) + const,          H = Σ_k G_k + μ G_m

is minimised by the least-squares target, every Gram damped like GPTQ's H
(G̃ = G + λ_G I, λ_G = percdamp · mean diag G, so a direction no input excites is pulled
toward the experts' and anchor's weights instead of making the system singular)

    W* = (Σ_k W_k G̃_k + μ W_m G̃_m) (Σ_k G̃_k + μ G̃_m)⁻¹ .

W* is then quantized with GPTQ under H (GPTQ damps H itself), so GPTQ's error feedback
minimises L, not the plain reconstruction error of W_m. With one expert and μ = 0, W* = W_1
(to float64 precision) and H = G_1: E-PMQ gives GPTQ's weights for that expert (with
``sequential=False`` whatever the merged model; with ``sequential=True`` when the merged model
is that expert, since the inputs then come from the merged model).

Choices. Each domain term is normalised by its size N_k, so experts count equally whatever
their data size, and μ weighs the anchor against one expert's term. ``sequential=True``
(default, as in GPTQ): every X (X_k and X_m) is taken in the merged model whose earlier layers
are already quantized, so each expert's target W_k X_k is expert k's layer applied to the
features the quantized layer will really see on domain k. ``sequential=False``: X_k from the
full-precision expert k on D_k and X_m from the full-precision merged model (the experts'
own activations). With activation quantization, X is taken after the layer's activation
quantizer. The weight step is searched again (per channel, ``config.step_method``) on W*, which
may leave W_m's range. Bias stays the merged bias. Grouped / depthwise convolutions: every Gram
matrix is per conv group (G_k,g, G_m,g; see :mod:`mergeq.ptq.gptq`), the objective splits into
one independent term per group, and W* and GPTQ are computed group by group.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..data_utils import as_tensor
from ..errors import IncompatibleModelsError
from ..merge.checks import check_mergeable
from ..nn import fold_bn
from ..quant import search_weight_step
from ..registry import PTQ_METHODS
from .base import PTQContext
from .gptq import GPTQOptions, group_rows, input_hessian, layer_order, quantize_layer

_OWN = ("experts", "expert_calib")  # the experts and their data: objects, passed at call time
# Below this many calibration inputs per expert E-PMQ fell below GPTQ on some seeds (docs/RESULTS.md
# §11, `benchmarks/pmq.py --calib-size`): each expert's term is then fitted to too few inputs.
MIN_EXPERT_CALIB = 85
log = logging.getLogger(__name__)


@dataclass
class EPMQOptions(GPTQOptions):
    anchor: float = 1.0  # μ, the weight of the merged-weight anchoring term


def _experts(ctx: PTQContext, experts, expert_calib) -> tuple[list[nn.Module], list[torch.Tensor]]:
    """Validate, copy and BN-fold the experts; validate their calibration data."""
    if experts is None or expert_calib is None:
        raise TypeError("epmq needs experts=[expert models] and expert_calib=[one calibration tensor per expert]")
    experts, expert_calib = list(experts), list(expert_calib)
    if not experts:
        raise ValueError("epmq needs at least one expert, got none")
    if any(not isinstance(e, nn.Module) for e in experts):
        raise TypeError("epmq: experts must be nn.Module instances")
    if len(expert_calib) != len(experts):
        raise ValueError(f"epmq: got {len(experts)} experts but {len(expert_calib)} expert_calib entries")
    check_mergeable(experts)
    data = [as_tensor(d, what=f"expert_calib[{k}]") for k, d in enumerate(expert_calib)]
    small = {k: len(d) for k, d in enumerate(data) if len(d) < MIN_EXPERT_CALIB}
    if small:
        log.warning("E-PMQ: expert_calib %s hold%s fewer than %d inputs (%s); with that little data per expert "
                    "E-PMQ was measured below GPTQ on some seeds (docs/RESULTS.md §11): give each expert more "
                    "calibration inputs, or compare with gptq", sorted(small), "s" if len(small) == 1 else "",
                    MIN_EXPERT_CALIB, ", ".join(f"{n}" for n in small.values()))
    example = ctx.calib[:2].to(ctx.device)
    ref = {k: v.shape for k, v in ctx.fp_model.state_dict().items()}
    folded = []
    for k, e in enumerate(experts):
        e = copy.deepcopy(e).to(ctx.device).eval()
        try:
            e = fold_bn(e, example) if ctx.config.fold_bn else e
        except RuntimeError as err:
            raise IncompatibleModelsError(f"expert {k} does not run on the merged model's inputs: {err}") from err
        sd = e.state_dict()
        bad = sorted(set(ref) ^ set(sd)) or [n for n, s in ref.items() if sd[n].shape != s]
        if bad:
            raise IncompatibleModelsError(f"expert {k} does not match the merged model at tensor {bad[0]!r}")
        folded.append(e.requires_grad_(False))
    return folded, data


def _damped(G: torch.Tensor, percdamp: float) -> torch.Tensor:
    return G + percdamp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


@torch.no_grad()
def epmq_target(Wm: torch.Tensor, Ws: list[torch.Tensor], Gs: list[torch.Tensor], Gm: torch.Tensor | None,
                anchor: float, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W*, H) of the module docstring for weights [out, n] and Gram matrices [n, n]; float64 W*."""
    Wm = Wm.to(torch.float64)
    terms = [(W.to(torch.float64), G.to(torch.float64)) for W, G in zip(Ws, Gs)]
    if Gm is not None and anchor > 0:
        terms.append((Wm, anchor * Gm.to(torch.float64)))
    H = sum(G for _, G in terms)
    A = sum(_damped(G, percdamp) for _, G in terms)
    num = sum(W @ _damped(G, percdamp) for W, G in terms)
    dead = A.diagonal() == 0  # no input ever reaches these columns (or percdamp = 0): keep W_m there
    A.diagonal()[dead] = 1.0
    num[:, dead] = Wm[:, dead]
    return torch.linalg.solve(A, num.T).T, H  # A is symmetric


def grouped_target(Wm: torch.Tensor, Ws: list[torch.Tensor], Gs: list[torch.Tensor], Gm: torch.Tensor | None,
                   anchor: float, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`epmq_target` for Gram matrices [n, n], or per conv group ([G, n, n]; rows of group g
    solved with the g-th matrices): (W* [out, n], H [n, n] or [G, n, n])."""
    if Gs[0].dim() == 2:
        return epmq_target(Wm, Ws, Gs, Gm, anchor, percdamp)
    parts = [epmq_target(Wm[rows], [W[rows] for W in Ws], [G[g] for G in Gs], None if Gm is None else Gm[g],
                         anchor, percdamp) for g, rows in enumerate(group_rows(Wm.shape[0], len(Gs[0])))]
    return torch.cat([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@PTQ_METHODS.register("epmq", options=EPMQOptions)
def epmq(qmodel: nn.Module, ctx: PTQContext) -> None:
    own = {k: ctx.options[k] for k in _OWN if k in ctx.options}
    opts = EPMQOptions.from_kwargs("epmq", {k: v for k, v in ctx.options.items() if k not in _OWN}, _OWN)
    anchor = float(opts.anchor)
    if not anchor >= 0:
        raise ValueError(f"epmq: anchor must be >= 0, got {opts.anchor!r}")
    experts, data = _experts(ctx, own.get("experts"), own.get("expert_calib"))
    qmodel.eval().requires_grad_(False)
    layers = layer_order(qmodel, ctx.calib[:2].to(ctx.device))
    if ctx.progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="epmq", unit="layer", disable=None)
    bs, dev = opts.capture_batch, ctx.device
    for name, m in layers:
        srcs = [qmodel] * len(experts) if opts.sequential else experts
        Gs = [input_hessian(src, name, m, d, bs, dev) for src, d in zip(srcs, data)]
        Gm = None
        if anchor > 0:
            Gm = input_hessian(qmodel if opts.sequential else ctx.fp_model, name, m, ctx.calib, bs, dev)
        out = m.weight.shape[0]
        Ws = [e.get_submodule(name).weight.detach().reshape(out, -1) for e in experts]
        Wstar, H = grouped_target(m.weight.detach().reshape(out, -1), Ws, Gs, Gm, anchor, opts.percdamp)
        Wstar = Wstar.to(m.weight.dtype)
        m.w_step.copy_(search_weight_step(Wstar.reshape(m.weight.shape), m.w_bits, ctx.config.step_method))
        quantize_layer(m, H, opts, Wstar, ctx.config.step_method)
