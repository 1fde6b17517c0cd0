"""Fused fake quantization for the reconstruction loop: one autograd node per quantizer.

``lsq_fake_quant`` is the LSQ activation quantizer (Esser et al., ICLR 2020, Eq. 1-3) with
QDrop's element-wise drop (Wei et al., ICLR 2022, Sec. 3.3) folded in:

    v = x / s,   x̂ = clamp(round(v), q_min, q_max) · s,   out = m ⊙ a + (1 - m) ⊙ x̂

where m ∈ {0, 1} is the keep-full-precision mask and ``a`` the full-precision alternative
(``x`` itself for QDrop's activation dropping). Gradients, those of the straight-through chain
``clamp(round_ste(x / s)) · s`` that BRECQ/QDrop's code (and mergeq before this module) build
from six autograd nodes:

    ∂out/∂x = (1 - m) · 1[q_min ≤ round(v) ≤ q_max]  (+ m where a is x)
    ∂out/∂s = (1 - m) · (clamp(round(v)) - v · 1[q_min ≤ round(v) ≤ q_max])
    ∂out/∂a = m

The range test uses the rounded value, as in the QDrop code. For our grids (q_min = 0 or even,
q_max odd; ties round to even) it is exactly q_min - ½ ≤ v < q_max + ½, which the backward
tests in one vectorised pass (``hardtanh_backward``, with the float just below q_min - ½ as
its exclusive lower bound). The step's own LSQ gradient scale g and |·| are applied inside:
``step`` is the raw parameter, s = max(|step|, 1e-8), ∂s/∂step = g · sign(step).

Why not PyTorch's ``torch._fake_quantize_learnable_per_tensor_affine``: on the CPU it was
slower than the unfused chain in our measurement (docs/PERFORMANCE.md), and it cannot drop.

``bernoulli_mask`` draws the QDrop masks as 0/1 floats: for p = ½ one random bit per element
(the bits of 64-bit random words, about 20x cheaper than ``torch.rand``), otherwise
``torch.rand(...) < p``. Both use torch's global generator of the device, so a seeded run
repeats. Masks are floats, never bool, so blending is ``lerp`` (exact for 0/1 weights), not
``torch.where`` on a random mask, which the CPU runs branch by branch. ``record_masks`` /
``replay_masks`` keep the masks one forward drew and hand them to a second forward of the same
step (TTAQ's perturbed pass) instead of drawing them again from a replayed random state.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_MIN_STEP = 1e-8
_BELOW: dict[tuple[int, torch.dtype], float] = {}


def _in_range(grad: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``grad`` where q_min ≤ round(v) ≤ q_max, i.e. q_min - ½ ≤ v < q_max + ½, else 0."""
    below = _BELOW.get((lo, v.dtype))
    if below is None:  # the largest float of v's dtype under q_min - ½
        t = torch.tensor(lo - 0.5, dtype=v.dtype)
        below = _BELOW[(lo, v.dtype)] = float(torch.nextafter(t, torch.tensor(float("-inf"), dtype=v.dtype)))
    return torch.ops.aten.hardtanh_backward(grad, v, below, hi + 0.5)


def bernoulli_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """0/1 tensor shaped and typed like ``like`` with P(1) = p, drawn from the global generator
    (inside :func:`replay_masks`: the next recorded mask instead, no random numbers drawn)."""
    if _TAPE["replay"] is not None:
        m = next(_TAPE["replay"], None)
        if m is None or m.shape != like.shape or m.dtype != like.dtype or m.device != like.device:
            raise RuntimeError("replay_masks: the replayed forward asks for other masks than the recorded one")
        return m
    m = _draw_mask(like, p)
    if _TAPE["record"] is not None:
        _TAPE["record"].append(m)
    return m


_TAPE: dict = {"record": None, "replay": None}


@contextlib.contextmanager
def record_masks() -> Iterator[list[torch.Tensor]]:
    """Within the block, every mask :func:`bernoulli_mask` draws is also appended to the list
    it yields (TTAQ's PCR hands the same masks to its perturbed pass)."""
    before, _TAPE["record"] = _TAPE["record"], []
    try:
        yield _TAPE["record"]
    finally:
        _TAPE["record"] = before


@contextlib.contextmanager
def replay_masks(masks: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, :func:`bernoulli_mask` returns ``masks`` in order (each checked against
    the shape asked for) instead of drawing: a forward that asks for the same masks in the same
    order gets the same values as when they were recorded, without drawing them again."""
    before, _TAPE["replay"] = _TAPE["replay"], iter(masks)
    try:
        yield
    finally:
        _TAPE["replay"] = before


def _draw_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    n = like.numel()
    if p == 0.5:
        words = torch.empty(-(-n // 64), dtype=torch.int64, device=like.device)
        words.random_(-(2**63), 2**63 - 1)  # the full 64-bit range: every bit fair
        byte = words.view(torch.uint8)
        # row k holds bit k of every byte (contiguous writes), all eight rows in one broadcast op
        bits = torch.bitwise_right_shift(byte.unsqueeze(0), _shifts(like.device)).bitwise_and_(1)
        return bits.view(-1)[:n].view(like.shape).to(like.dtype)
    return torch.rand(like.shape, device=like.device, dtype=like.dtype).lt_(p)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    """The column [0, 1, ..., 7] (uint8) on ``device``, made once per device."""
    t = _SHIFTS.get(device)
    if t is None:
        t = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device).unsqueeze(1)
    return t


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of ``like``'s dtype and device (made once; never written)."""
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, lo, hi, g, keep, alt):
        s = step.detach().abs().clamp_min(_MIN_STEP)
        v = x / s
        q = torch.round(v).clamp_(lo, hi)
        out = q * s
        if keep is not None:
            out.lerp_(x if alt is None else alt, keep)
        ctx.lo, ctx.hi, ctx.g, ctx.alt_is_x = lo, hi, g, alt is None
        ctx.save_for_backward(v, q, keep, step)
        return out

    @staticmethod
    def backward(ctx, grad):
        v, q, keep, step = ctx.saved_tensors
        gq = grad if keep is None else grad.lerp(_zero(grad), keep)
        gx = _in_range(gq, v, ctx.lo, ctx.hi)
        g_step = g_alt = None
        if ctx.needs_input_grad[1]:
            gs = torch.dot(gq.reshape(-1), q.reshape(-1)) - torch.dot(gx.reshape(-1), v.reshape(-1))
            # ∂s/∂step · g = g·sign(step)·1[|step| > min], every factor exact (0, ±1, ±g)
            g_step = gs * torch.sign(step).mul_(ctx.g).mul_(step.abs() > _MIN_STEP)
        if keep is not None:
            if ctx.alt_is_x:
                if ctx.needs_input_grad[0]:  # the kept elements' gradient (none needed: skipped)
                    gx.addcmul_(grad, keep)
            elif ctx.needs_input_grad[6]:
                g_alt = grad * keep
        return (gx if ctx.needs_input_grad[0] else None), g_step, None, None, None, None, g_alt


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, grad_scale: float = 1.0,
                   keep: torch.Tensor | None = None, alt: torch.Tensor | None = None) -> torch.Tensor:
    """LSQ fake quantization of ``x`` on the grid ``[lo, hi]·|step|`` (see the module docstring).

    ``keep``: optional 0/1 mask of elements that take the full-precision value ``alt``
    (default ``x``) instead of their quantized one (QDrop).
    """
    if alt is not None and keep is None:
        raise ValueError("lsq_fake_quant: alt needs a keep mask")
    return _LSQ.apply(x, step, lo, hi, grad_scale, keep, alt)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, step, lo, hi):
        v = w / step
        q = torch.round(v).clamp_(lo, hi)
        ctx.lo, ctx.hi, ctx.step_shape = lo, hi, step.shape
        ctx.save_for_backward(v, q if ctx.needs_input_grad[1] else None)
        return q * step

    @staticmethod
    def backward(ctx, grad):
        v, q = ctx.saved_tensors
        gw = _in_range(grad, v, ctx.lo, ctx.hi)
        g_step = None
        if q is not None:  # LSQ: ∂ŵ/∂Δ = clamp(round(v)) - v·1[inside], summed to Δ's shape
            inside = _in_range(torch.ones_like(v), v, ctx.lo, ctx.hi)
            g_step = (q - v * inside).mul_(grad).sum_to_size(ctx.step_shape)
        return gw, g_step, None, None


def ste_fake_quant(w: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(round(w/Δ), lo, hi)·Δ with the straight-through gradient for ``w`` and LSQ's for Δ
    (where Δ requires grad): the values and gradients of ``clamp(round_ste(w/Δ))·Δ`` in one node."""
    return _STE.apply(w, step, lo, hi)
