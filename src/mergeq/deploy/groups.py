"""Grouped weight steps in compact form: one step per (output channel, group) and a group index
per input column, as GPTQ's ``g_idx`` (Frantar et al., 2023, Sec. 4 "Additional details").

A QuantModule's ``w_step`` is either per output channel (``[C, 1, ...]``) or, after GPTQ with
``group_size``, per weight element (the weight's shape; ``mergeq.ptq.gptq``). Flattening the
weight to ``[C, n]`` (a conv's ``in * kh * kw`` columns), the per-element steps take one value
per column group: ``steps[:, g_idx]`` rebuilds them exactly. Groups are found from the steps
themselves (identical step columns form one group, numbered in order of first appearance), so
contiguous GPTQ groups of ``g`` columns give ``g_idx = j // g`` and act-order groups give the
permuted index, with no knowledge of how the steps were made.
"""
from __future__ import annotations

import torch

from ..nn.qmodule import QuantModule


def is_grouped(m: QuantModule) -> bool:
    """Whether ``m`` has per-element (grouped) weight steps rather than one per output channel."""
    return m.w_step.numel() != m.weight.shape[0]


def weight_groups(m: QuantModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(steps, g_idx)``: float32 ``[C, G]`` steps and int64 ``[n]`` column groups (``None``: per channel)."""
    c = m.weight.shape[0]
    step = m.w_step.detach().cpu().float()
    if not is_grouped(m):
        return step.reshape(c, 1), None
    cols = step.reshape(c, -1).T  # [n, C]: column j's steps
    uniq, inverse = torch.unique(cols, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(inverse), dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(len(inverse)), reduce="amin")
    order = torch.argsort(first)  # groups in order of first appearance
    relabel = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
    return uniq[order].T.contiguous(), relabel[inverse]


def contiguous_block(g_idx: torch.Tensor) -> int | None:
    """``B`` if ``g_idx[j] == j // B`` for every column (contiguous groups of ``B``), else ``None``."""
    n = len(g_idx)
    block = int((g_idx == 0).sum())
    if block and torch.equal(g_idx, torch.arange(n) // block):
        return block
    return None


def expand_steps(steps: torch.Tensor, g_idx: torch.Tensor | None, shape: list[int]) -> torch.Tensor:
    """The QuantModule ``w_step`` for a weight of ``shape``: ``[C, 1, ...]`` or per element."""
    if g_idx is None:
        return steps.reshape((shape[0],) + (1,) * (len(shape) - 1))
    return steps[:, g_idx].reshape(shape)
