"""Online test-time adaptation on a stream of domains: TENT, and TENT with TTAQ's ABL.

**TENT** (Wang et al., ICLR 2021, Sec. 3): BatchNorm normalises with the statistics of the
current test batch (running statistics dropped), only the BN affine parameters γ, β are
trained, by minimising the mean prediction entropy H(ŷ) = -Σ_c p_c log p_c of each batch, one
step per batch, online: the batch's predictions come from the forward pass that computes the
loss (predict, then update). Optimiser: Adam, lr 1e-3, β = (0.9, 0.999), as the paper's
CIFAR-10-C setting (its ImageNet setting, SGD lr 2.5e-4 momentum 0.9, is ``optimizer="sgd"``).
Continual (CoTTA's protocol): the state carries over from domain to domain, never reset.
Everything else is frozen: in a quantized model the QuantModule weights (on their grid), weight
steps and activation steps are never touched, so the integer codes stay bit-identical.

**ABL** (TTAQ's adaptive balanced loss, arXiv 2412.09899 Sec. 3.4; only its abstract could be
read here: "adjust ... by taking advantage of the frequency and complexity of the class").
Our reading, with ŷ_i = argmax p_i the pseudo-label, K classes, momentum m (default 0.9):

    π_c ← m π_c + (1-m) · |{i: ŷ_i = c}| / B                      running class frequency
    γ_c ← m γ_c + (1-m) · Σ_{i: ŷ_i = c} ‖g_i‖ / Σ_i ‖g_i‖          accumulated gradient share
    w_i ∝ (K π_ŷi)^(-a) · (K γ_ŷi)^(-b),  normalised to mean 1 over the batch, capped at w_max
    L = (1/B) Σ_i w_i H(softmax(z_i - τ log π))

where g_i = ∂H_i/∂z_i = -p_i ⊙ (log p_i + H_i) is the entropy gradient at the logits
(closed form, no extra backward pass). π and γ start uniform (1/K) and the current batch is
folded in before its weights are computed (as DELTA's DOT, Zhao et al. ICLR 2023, which ABL
extends with the gradient term). A class the stream keeps predicting, or that has driven most
of the adaptation so far, gets weights below 1; a rare class gets weights above 1.
*Choices*: a = b = 0.5 (geometric mean of the two inverse ratios), w_max = 10, m = 0.9; the
abstract's logit adjustment is the option τ (default 0: off, the stream's first domains would
otherwise push predictions towards classes the model has not yet seen).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits) (nats)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def entropy_grad_norm(logits: torch.Tensor) -> torch.Tensor:
    """‖∂H/∂z‖ per sample, with ∂H/∂z_k = -p_k (log p_k + H)."""
    log_p = F.log_softmax(logits.detach(), dim=1)
    p = log_p.exp()
    h = -(p * log_p).sum(1, keepdim=True)
    return (-p * (log_p + h)).norm(dim=1)


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """Set ``model`` up for TENT in place; return the BN affine parameters (the only trainable ones).

    Everything is frozen and in eval mode except the BatchNorm layers, which go to train mode
    with their running statistics removed (they normalise with batch statistics from now on).
    """
    model.eval().requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, _BN):
            m.train()
            m.track_running_stats = False
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
            if m.affine:
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                params += [m.weight, m.bias]
    if not params:
        raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer for TENT to adapt "
                         "(was BN folded? quantize with QuantConfig(fold_bn=False))")
    return params


@dataclass
class TentConfig:
    optimizer: str = "adam"  # "adam" (TENT on CIFAR-10-C) | "sgd" (TENT on ImageNet-C)
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    steps: int = 1  # gradient steps per batch


@dataclass
class ABLConfig:
    momentum: float = 0.9
    freq_power: float = 0.5  # a
    grad_power: float = 0.5  # b
    max_weight: float = 10.0
    tau: float = 0.0  # logit adjustment z - τ log π (0: off)
    eps: float = 1e-6


class ABL:
    """Running class statistics and per-sample weights of the adaptive balanced loss (see module doc)."""

    def __init__(self, num_classes: int, config: ABLConfig | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"ABL needs at least 2 classes, got {num_classes}")
        self.k, self.cfg = num_classes, config or ABLConfig()
        if not 0.0 <= self.cfg.momentum < 1.0:
            raise ValueError(f"ABL momentum must lie in [0, 1), got {self.cfg.momentum}")
        self.freq = torch.full((num_classes,), 1.0 / num_classes)
        self.grad = torch.full((num_classes,), 1.0 / num_classes)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold a batch into π and γ; return its pseudo-labels."""
        if logits.dim() != 2 or logits.shape[1] != self.k or len(logits) == 0:
            raise ValueError(f"ABL expects non-empty logits B x {self.k}, got shape {tuple(logits.shape)}")
        z = logits.detach().float()  # on its device: no host sync per batch
        pred = z.argmax(1)
        m = self.cfg.momentum
        counts = torch.bincount(pred, minlength=self.k).float()
        g = entropy_grad_norm(z)
        mass = torch.zeros(self.k, device=z.device).index_add_(0, pred, g)
        total = mass.sum()
        share = torch.where(total > 0, mass / total.clamp_min(torch.finfo(total.dtype).tiny), counts / counts.sum())
        self.freq, self.grad = self.freq.to(z.device), self.grad.to(z.device)
        self.freq = m * self.freq + (1 - m) * counts / len(pred)
        self.grad = m * self.grad + (1 - m) * share
        return pred

    @torch.no_grad()
    def class_weights(self) -> torch.Tensor:
        c = self.cfg
        w = (self.k * self.freq + c.eps).pow(-c.freq_power) * (self.k * self.grad + c.eps).pow(-c.grad_power)
        return w

    @torch.no_grad()
    def weights(self, pred: torch.Tensor) -> torch.Tensor:
        """Per-sample weights for pseudo-labels ``pred``: mean 1 over the batch, capped at max_weight."""
        w = self.class_weights()[pred]
        w = w / w.mean()
        return w.clamp(max=self.cfg.max_weight)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Update the statistics with this batch, then the weighted (optionally logit-adjusted) entropy."""
        pred = self.update(logits)
        w = self.weights(pred).to(logits.device, logits.dtype)
        z = logits
        if self.cfg.tau:
            z = logits - self.cfg.tau * torch.log(self.freq + self.cfg.eps).to(logits.device, logits.dtype)
        return (w * entropy(z)).mean()


class NoAdapt:
    """The model as it is: eval mode, no gradient."""

    name = "none"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Tent:
    """TENT (``abl=None``) or TENT with ABL's weighted entropy, on a copy of ``model`` (unless ``copy=False``)."""

    def __init__(self, model: nn.Module, config: TentConfig | None = None, abl: ABL | None = None,
                 copy_model: bool = True) -> None:
        self.cfg = config or TentConfig()
        self.model = copy.deepcopy(model) if copy_model else model
        self.params = configure_tent(self.model)
        self.abl = abl
        self.name = "tent+abl" if abl is not None else "tent"
        if self.cfg.steps < 1:
            raise ValueError(f"TENT needs steps >= 1, got {self.cfg.steps}")
        if self.cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(self.params, lr=self.cfg.lr, betas=(0.9, 0.999))
        elif self.cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=self.cfg.momentum)
        else:
            raise ValueError(f"TENT optimizer must be 'adam' or 'sgd', got {self.cfg.optimizer!r}")

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        return self.abl.loss(logits) if self.abl is not None else entropy(logits).mean()

    @torch.enable_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for _ in range(self.cfg.steps):
            logits = self.model(x)
            out = logits.detach() if out is None else out  # predictions of the first (pre-update) pass
            self.opt.zero_grad(set_to_none=True)
            self.loss(logits).backward()
            self.opt.step()
        return out


Adapter = Callable[[torch.Tensor], torch.Tensor]


def run_stream(adapter: Adapter | nn.Module, stream, batch_size: int = 64, device: str | torch.device = "cpu",
               progress: bool = False, desc: str = "stream") -> dict[str, Any]:
    """Feed ``stream`` ([(domain, Dataset of (image, label))], data.corruptions) batch by batch, online,
    no reset.

    Returns ``{"domains", "error": {domain: error}, "mean_error", "batch_error": [...],
    "batch_domain": [...], "class_error": [per class over the whole stream], "n"}``; errors are
    fractions in [0, 1], ``mean_error`` the mean of the per-domain errors.
    """
    from ..data.corruptions import stream_batches

    if isinstance(adapter, nn.Module):
        adapter = NoAdapt(adapter)
    if not stream:
        raise ValueError("the stream has no domains")
    empty = [name for name, ds in stream if len(ds) == 0]
    if empty:
        raise ValueError(f"stream domains {empty} hold no images")
    total = sum(-(-len(ds) // batch_size) for _, ds in stream) if batch_size >= 1 else 0
    batches = stream_batches(stream, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=None)
    preds, labels, batch_domain, k = [], [], [], 0
    for name, x, y in batches:
        logits = adapter(x.to(device))
        preds.append(logits.argmax(1))  # kept on the device: one copy to the host after the stream
        labels.append(y)
        batch_domain.append(name)
        k = logits.shape[1]
    wrong: dict[str, int] = {}
    seen: dict[str, int] = {}
    batch_error = []
    cls_wrong, cls_seen = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    sizes = [len(y) for y in labels]
    for name, pred, y in zip(batch_domain, torch.cat(preds).cpu().split(sizes), labels):
        miss = (pred != y).long()
        cls_wrong.index_add_(0, y, miss)
        cls_seen.index_add_(0, y, torch.ones_like(y))
        wrong[name] = wrong.get(name, 0) + int(miss.sum())
        seen[name] = seen.get(name, 0) + len(y)
        batch_error.append(float(miss.float().mean()))
    domains = [name for name, _ in stream]
    error = {d: wrong[d] / seen[d] for d in domains}
    class_error = [float(w) / float(s) if s else None for w, s in zip(cls_wrong.tolist(), cls_seen.tolist())]
    return {"domains": domains, "error": error, "mean_error": sum(error.values()) / len(error),
            "batch_error": batch_error, "batch_domain": batch_domain, "class_error": class_error,
            "n": seen}
