"""Supervised training of the source model (the starting point of SHOT's experts).

Cross-entropy with label smoothing (SHOT, Liang et al. 2020, section 3.1, trains its
source model with smoothing 0.1), SGD+momentum or Adam, cosine learning-rate decay,
and augmentation written in torch (no torchvision):

* small random affine maps (rotation, scale, translation) via ``affine_grid``;
* colour jitter as a random per-image channel-mixing matrix ``I + N(0, color^2)``
  followed by per-image, per-channel re-standardisation (the data are standardised
  that way, see ``mergeq.data.digits``), so brightness/contrast changes are undone
  and only the channel mix and gain are perturbed;
* additive Gaussian noise.

The budget is a number of optimizer steps (:func:`train_steps`): ``steps`` when set, else
``epochs`` passes over the data (``n // batch_size`` steps each, the ragged last batch dropped)
but at least ``min_steps``, so that 100 images train as well as 50,000 (6 passes over 96 images
would be 18 steps). The floor sits below the digits benchmark's budgets, whose step counts the
epochs decide.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data.digits import standardize
from ..data_utils import take

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    epochs: int = 6  # passes over the data, when steps is None
    steps: int | None = None  # optimizer steps (None: train_steps' rule)
    min_steps: int = 80  # the floor of the epoch rule
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    rotate: float = 10.0  # max degrees
    scale: float = 0.1  # max relative zoom
    translate: float = 0.1  # max shift, fraction of half the image (0.1 = 1.6 px)
    color: float = 0.2  # std of the channel-mixing perturbation; 0 disables
    noise: float = 0.0  # std of additive Gaussian noise (in standardised units)


def augment(x: torch.Tensor, cfg: SourceConfig, g: torch.Generator) -> torch.Tensor:
    """Random affine + colour (channel mix) jitter + noise on a standardised batch. ``g`` is a CPU
    generator (the same draws on every device); the draws move to ``x``'s device."""
    n = x.shape[0]
    u = lambda *s: (torch.rand(*s, generator=g) * 2 - 1).to(x.device)  # noqa: E731  uniform in [-1, 1)
    if cfg.rotate or cfg.scale or cfg.translate:
        a = u(n) * math.radians(cfg.rotate)
        s = 1 + u(n) * cfg.scale
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos() / s, -a.sin() / s
        theta[:, 1, 0], theta[:, 1, 1] = a.sin() / s, a.cos() / s
        theta[:, :, 2] = u(n, 2) * cfg.translate
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        bg = x.amin(dim=(2, 3), keepdim=True)  # pad with the image's background level
        x = F.grid_sample(x - bg, grid, align_corners=False) + bg
    if cfg.color:
        c = x.shape[1]
        mix = torch.eye(c, device=x.device) + cfg.color * torch.randn(n, c, c, generator=g).to(x.device)
        x = standardize(torch.einsum("nij,njhw->nihw", mix, x))
    if cfg.noise:
        x = x + cfg.noise * torch.randn(x.shape, generator=g).to(x.device)
    return x


def _lr_at(base: float, step: int, total: int) -> float:
    """Cosine decay to zero over ``total`` steps."""
    return 0.5 * base * (1 + math.cos(math.pi * step / max(total, 1)))


def train_steps(cfg, n: int) -> int:
    """Optimizer steps of a budget (``SourceConfig`` / ``ShotConfig``) on ``n`` items: ``cfg.steps``,
    else ``max(cfg.min_steps, cfg.epochs * max(1, n // cfg.batch_size))``."""
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise ValueError(f"steps must be at least 1 (or null: the epoch rule), got {cfg.steps}")
        return cfg.steps
    return max(cfg.min_steps, cfg.epochs * max(1, n // cfg.batch_size))


def passes(n: int, batch_size: int, total: int):
    """Yield ``(pass, steps)``: the budget ``total`` as passes of ``n // batch_size`` steps (one
    shuffle each), the last one cut short where the budget ends mid-pass."""
    per_pass, done, k = max(1, n // batch_size), 0, 0
    while done < total:
        steps = min(per_pass, total - done)
        yield k, steps
        done, k = done + steps, k + 1


def step_bar(progress: bool, total: int, desc: str):
    """A tqdm bar over ``total`` optimizer steps, or None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One step of ``opt`` on ``loss`` (gradients cleared first); the loss, detached."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd")


def train_source(model: nn.Module, dataset: Dataset, cfg: SourceConfig, seed: int = 0,
                 device: str = "cpu", progress: bool = False) -> nn.Module:
    """Train a copy of ``model`` on ``dataset`` of (image, label) items; returns it in eval mode.

    ``dataset``: any map-style Dataset (a ``TensorDataset``, or lazy images read batch by batch)."""
    model = copy.deepcopy(model).to(device).train()
    n = len(dataset)
    if n == 0:
        raise ValueError("train_source needs a non-empty labeled dataset")
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    total, step = train_steps(cfg, n), 0
    bar = step_bar(progress, total, "source")
    for k, steps in passes(n, cfg.batch_size, total):
        perm = torch.randperm(n, generator=g)
        running = torch.zeros((), device=device)
        for i in range(steps):
            xb, yb = take(dataset, perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            if yb is None:
                raise ValueError("train_source needs labeled data: (image, label) items")
            xb, yb = augment(xb.to(device), cfg, g), yb.to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg.lr, step, total)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            running += optimizer_step(opt, loss)
            step += 1
            if bar is not None:
                bar.update()
        log.debug("source pass %d: step %d/%d, loss %.4f", k + 1, step, total, float(running) / steps)
    if bar is not None:
        bar.close()
    log.info("source training: %d optimizer steps (%d passes over %d images), last pass loss %.4f",
             total, k + 1, n, float(running) / steps)
    return model.eval()
