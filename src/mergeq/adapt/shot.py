"""SHOT: source-free domain adaptation by hypothesis transfer.

Liang, Hu & Feng, "Do We Really Need to Access the Source Data? Source Hypothesis
Transfer for Unsupervised Domain Adaptation", ICML 2020 (section 3.2-3.3).

The source classifier head ``h`` (``get_classifier``: the last ``nn.Linear``) is frozen;
the feature extractor ``g`` (everything else, including BatchNorm statistics) is trained
on unlabeled target images x with

    L = ent_weight * (E_x[H(p(x))] - H(E_x[p(x)]))          # information maximisation
        + beta * CE(p(x), y_hat(x))                          # self-supervised pseudo-labels

where p = softmax(h(g(x))), H is the entropy, and y_hat comes from feature-space
centroids (SHOT Eq. 4-6), recomputed with the model in eval mode at the start of
every pass: c_k = sum_x p_k(x) g(x) / sum_x p_k(x); y_hat = argmin_k cos-dist(g(x), c_k);
then one refinement round with hard-label centroids. As in SHOT's code, features get
a constant 1 appended and are L2-normalised before the cosine distances.

The budget is in optimizer steps (``mergeq.adapt.source.train_steps``: ``steps``, else
``epochs`` passes with a floor of ``min_steps``); pseudo-labels are recomputed at the start of
every pass over the data. Learning-rate decay lr*(1+10p)^-0.75 as in SHOT's code. Our addition,
on by default (``recalibrate_bn``): BN running statistics are re-estimated on the target data (a full
pass, cumulative average; AdaBN, Li et al. 2016) before each epoch's pseudo-labelling
and after training. SHOT labels with the model in eval mode, i.e. at epoch 0 with the
*source* BN statistics; on our digits shifts those labels are poor (AdaBN alone beat
SHOT without it) and the cross-entropy term then drags the expert below AdaBN. It
also makes the expert's BN buffers exact target statistics, which merging averages.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data_utils import iter_batches, take
from ..models import get_classifier
from .source import make_optimizer, optimizer_step, passes, step_bar, train_steps

log = logging.getLogger(__name__)


@dataclass
class ShotConfig:
    epochs: int = 5  # passes over the target data, when steps is None
    steps: int | None = None  # optimizer steps (None: max(min_steps, epochs * (n // batch_size)))
    min_steps: int = 50  # the floor of the epoch rule
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    beta: float = 0.3  # pseudo-label cross-entropy weight (SHOT's cls_par)
    ent_weight: float = 1.0  # information-maximisation weight (SHOT's ent_par)
    epsilon: float = 1e-5
    recalibrate_bn: bool = True


class _HeadInput:
    """Forward pre-hook that records the input of the classifier head (the features)."""

    def __init__(self, head: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = torch.flatten(args[0], 1)


def information_maximization(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the mean prediction (SHOT Eq. 2-3)."""
    p = logits.softmax(dim=1)
    ent = -(p * torch.log(p + eps)).sum(dim=1).mean()
    p_mean = p.mean(dim=0)
    div = -(p_mean * torch.log(p_mean + eps)).sum()
    return ent - div


def centroid_pseudo_labels(features: torch.Tensor, probs: torch.Tensor, rounds: int = 1) -> torch.Tensor:
    """SHOT's clustering pseudo-labels: soft centroids, cosine assignment, ``rounds`` refinements."""
    f = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype, device=features.device)], dim=1)
    f = F.normalize(f, dim=1)
    weights = probs
    for _ in range(rounds + 1):
        centroids = weights.t() @ f / (weights.sum(dim=0)[:, None] + 1e-8)
        dist = 1 - f @ F.normalize(centroids, dim=1).t()
        labels = dist.argmin(dim=1)
        weights = F.one_hot(labels, probs.shape[1]).to(f.dtype)
    return labels


@torch.no_grad()
def _features_and_probs(model: nn.Module, rec: _HeadInput, data: torch.Tensor | Dataset, bs: int, device: str):
    feats, probs = [], []
    for x in iter_batches(data, bs):
        probs.append(model(x.to(device)).softmax(dim=1))  # kept on the device: pseudo-labels are computed there
        feats.append(rec.value)
    return torch.cat(feats), torch.cat(probs)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor | Dataset, bs: int = 256, device: str = "cpu") -> None:
    """Reset every BN's running statistics and re-estimate them on ``x`` (images, or a Dataset of
    (image, label) items) by a cumulative average."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb in iter_batches(x, bs):
        model(xb.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def shot(source_model: nn.Module, dataset: Dataset, cfg: ShotConfig, seed: int = 0,
         device: str = "cpu", progress: bool = False) -> nn.Module:
    """Adapt a copy of ``source_model`` to the unlabeled images of ``dataset`` with SHOT.

    ``dataset``: any map-style Dataset of images or (image, label) items (labels are never read),
    a ``TensorDataset`` or lazy images decoded batch by batch."""
    model = copy.deepcopy(source_model).to(device)
    head = get_classifier(model)
    for p in head.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    n = len(dataset)
    if n == 0:
        raise ValueError("shot needs a non-empty target dataset")
    g = torch.Generator().manual_seed(seed)
    rec = _HeadInput(head)
    total, step = train_steps(cfg, n), 0
    bar = step_bar(progress, total, "shot")
    try:
        for k, steps in passes(n, cfg.batch_size, total):
            if cfg.recalibrate_bn:
                recalibrate_batchnorm(model, dataset, device=device)
            model.eval()
            feats, probs = _features_and_probs(model, rec, dataset, 256, device)
            pseudo = centroid_pseudo_labels(feats, probs, rounds=1)
            model.train()
            perm = torch.randperm(n, generator=g)
            running = torch.zeros((), device=device)
            for i in range(steps):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                logits = model(take(dataset, idx)[0].to(device))
                loss = cfg.ent_weight * information_maximization(logits, cfg.epsilon)
                if cfg.beta:
                    loss = loss + cfg.beta * F.cross_entropy(logits, pseudo[idx].to(device))
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * (1 + 10 * step / total) ** -0.75
                running += optimizer_step(opt, loss)
                step += 1
                if bar is not None:
                    bar.update()
            log.debug("shot pass %d: step %d/%d, loss %.4f", k + 1, step, total, float(running) / steps)
    finally:
        rec.handle.remove()
        if bar is not None:
            bar.close()
    log.info("SHOT: %d optimizer steps (%d passes over %d images), last pass loss %.4f",
             total, k + 1, n, float(running) / steps)
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(model, dataset, device=device)
    for p in head.parameters():
        p.requires_grad_(True)
    return model.eval()
