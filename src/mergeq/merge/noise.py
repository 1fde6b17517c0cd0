"""Noise-sampling rounding for merging quantized experts (HDRQ paper Sec. 4.3, Eq. 12).

``noise`` (the paper): draw S samples of
    I = round(Σ α_k (I_k Δ_k + ε_k) / Σ α_k Δ_k),   ε_k ~ U[-Δ_k/2, Δ_k/2] element-wise,
(ε_k never changes expert k's own code: I_k Δ_k + ε_k still rounds to I_k on its grid) and
keep the sample with the highest cosine similarity between (w - w_1) and the interpolation
direction (w_2 - w_1), where w = I·Δ is the sample's dequantized weight and w_k = I_k Δ_k.
For N experts the direction is (w̄ - w_k) with w̄ = Σ α_k w_k (parallel to w_2 - w_1 when N = 2);
``anchor="first"`` scores against expert 1 as the paper does, ``anchor="all"`` averages the
score over all experts. ``select="layer"`` (default) keeps the best sample per layer;
``select="model"`` scores the concatenation of all layers and keeps one whole-model sample.
Per layer is the default because it measured higher and steadier on the digits two-target
merges (docs/RESULTS.md §6: a higher mean hmean in all four cells, by 0.4-0.7 points, and a
higher minimum in three of four). ``filter=False``
returns the first sample (the unfiltered distribution).

``samples`` (candidates per merge) defaults to 100, the reference code's count. The paper's
"mean results from 30 sampled weights" is the number of merges averaged for reporting
(``merge.repeats``). Measured on the three-target HDRQ merges (docs/RESULTS.md §6b,
``benchmarks/merge_candidates.py``): at W3A3, 1-30 candidates gave 82.2-83.9 mean hmean with a
5-14 point spread between merge seeds; 100 candidates gave 86.2 with a 3.5 point spread. At W4A4
the count made no difference.

``noise-ties`` (the authors' reference code, github.com/ewsn1593/HDRQ): start from the
integer mid-point merge; noise is added only where Σ α_k I_k is ambiguous (for two experts,
where I_1 + I_2 is odd), in code units, so each tie goes to either neighbour of the mid-point
with probability 1/2; run ``samples`` (default 100) trials per layer and accept a trial only
when it raises |cos(w - w_k, w̄ - w_k)| for every expert k at once.

Random draws come from a generator on the codes' device (``seed``): no host-device copy per
draw on a GPU; a CPU and a GPU draw different (each reproducible) noise for the same seed.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .rounding import ROUNDINGS, LayerStack, nearest_rounding


def noise_sample(layer: LayerStack, alphas: Sequence[float], g: torch.Generator) -> torch.Tensor:
    """One draw of Eq. 12, clamped to the grid."""
    num = 0.0
    for a, i, s in zip(alphas, layer.codes, layer.steps):
        eps = (torch.rand(i.shape, generator=g, dtype=i.dtype, device=i.device) - 0.5) * s
        num = num + a * (i * s + eps)
    return layer.clamp(torch.round(num / layer.merged_step(alphas)))


def generator(layers: list[LayerStack], seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the device of the experts' codes."""
    return torch.Generator(device=layers[0].codes[0].device if layers else "cpu").manual_seed(seed)


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x.flatten(), y.flatten(), dim=0, eps=1e-12)


def cosine_score(samples: list[torch.Tensor], layers: list[LayerStack], alphas: Sequence[float],
                 anchor: str = "first") -> torch.Tensor:
    """cos(w - w_k, w̄ - w_k) of a (list of layers') sample, expert 1 or averaged over experts."""
    w = torch.cat([(c * l.merged_step(alphas)).flatten() for c, l in zip(samples, layers)])
    ws = [torch.cat([l.weights()[k].flatten() for l in layers]) for k in range(len(alphas))]
    mean = sum(a * wk for a, wk in zip(alphas, ws))
    anchors = ws[:1] if anchor == "first" else ws
    return torch.stack([_cos(w - wk, mean - wk) for wk in anchors]).mean()


@ROUNDINGS.register("noise")
def noise_rounding(layers: list[LayerStack], alphas: Sequence[float], samples: int = 100, seed: int = 0,
                   select: Literal["layer", "model"] = "layer", anchor: Literal["first", "all"] = "first",
                   filter: bool = True) -> list[torch.Tensor]:
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if select not in ("model", "layer") or anchor not in ("first", "all"):
        raise ValueError(f"select must be model|layer and anchor first|all, got {select!r}, {anchor!r}")
    g = generator(layers, seed)
    units = [list(range(len(layers)))] if select == "model" else [[j] for j in range(len(layers))]
    best: list[torch.Tensor | None] = [None] * len(layers)
    top: list[torch.Tensor | None] = [None] * len(units)
    for _ in range(samples if filter else 1):  # only the best draw is kept: memory does not grow with samples
        draw = [noise_sample(layer, alphas, g) for layer in layers]
        for u, idx in enumerate(units):
            score = cosine_score([draw[j] for j in idx], [layers[j] for j in idx], alphas, anchor)
            better = torch.ones((), dtype=torch.bool, device=score.device) if top[u] is None else score > top[u]
            top[u] = score if top[u] is None else torch.where(better, score, top[u])
            for j in idx:  # the first of equal scores wins, as argmax does; a tensor test: no host sync per draw
                best[j] = draw[j] if best[j] is None else torch.where(better, draw[j], best[j])
    return best


@ROUNDINGS.register("noise-ties")
def noise_ties_rounding(layers: list[LayerStack], alphas: Sequence[float], samples: int = 100,
                        seed: int = 0) -> list[torch.Tensor]:
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    g = generator(layers, seed)
    out = []
    for layer, current in zip(layers, nearest_rounding(layers, alphas)):
        mid = sum(a * i for a, i in zip(alphas, layer.codes))
        ambiguous = (mid - torch.floor(mid) - 0.5).abs() < 1e-6
        if not ambiguous.any():
            out.append(current)
            continue
        step = layer.merged_step(alphas)
        ws = layer.weights()
        wbar = sum(a * w for a, w in zip(alphas, ws))

        def scores(codes: torch.Tensor) -> torch.Tensor:
            return torch.stack([_cos(codes * step - wk, wbar - wk).abs() for wk in ws])

        best = scores(current)
        for _ in range(samples):
            up = torch.rand(mid.shape, generator=g, device=mid.device) < 0.5
            cand = torch.where(ambiguous, torch.floor(mid) + up.to(mid.dtype), current)
            s = scores(cand)
            accept = (s > best).all()  # a tensor: no device-to-host sync per trial
            current, best = torch.where(accept, cand, current), torch.where(accept, s, best)
        out.append(current)
    return out
