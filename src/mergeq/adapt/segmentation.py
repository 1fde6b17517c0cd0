"""Segmentation source training and single-target self-training adaptation (DACS as in DAFormer).

Hoyer, Dai & Van Gool, "DAFormer", CVPR 2022 (section 3) on Tranheden et al., "DACS", WACV 2021;
read from lhoyer/DAFormer: ``mmseg/models/uda/dacs.py``, ``mmseg/models/utils/dacs_transforms.py``
(our :mod:`.seg_augment`), ``mmseg/datasets/uda_dataset.py``, ``configs/_base_/uda/dacs.py``,
``configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py``.

Loss: per-pixel cross-entropy, pixels labelled 255 give 0 but count in the mean, as mmseg 0.x's
``CrossEntropyLoss`` (``reduction='none'`` then the mean over every pixel). Optimiser (both stages):
AdamW, weight decay 0.01, the parameters whose dotted name starts with ``head_prefix`` (default
``decode_head``, mmseg's and ``deeplab_mini``'s name for it; DAFormer's ``custom_keys`` match any
name containing ``head``) at ``head_lr_mult`` (10) times the lr; mmcv's
``poly`` schedule with linear warm-up (:func:`warmup_poly_lr`, power 1, warm-up ratio 1e-6) over a
``warmup`` share of the steps (DAFormer: 1,500 of 40,000 = 0.0375). DAFormer's no-decay on norm
layers is left out (mmseg's ResNet names its BNs ``bn*``, so the HDRQ/HRDA ResNet runs decay them
too). Augmentation: flip + random zoom/crop (:func:`.seg_augment.flip_scale_crop`) of source and
target images.

DACS step ``i`` (0-based), as ``DACS.forward_train``: the teacher is the student at ``i = 0``, else
``teacher = a_i teacher + (1 - a_i) student`` over the parameters with ``a_i = min(1 - 1/(i+1),
alpha)`` (:func:`ema_update`); source CE on a source batch (backward); the teacher's softmax on the
target batch gives pseudo-labels (argmax) and, per image, the weight = share of its pixels whose max
probability is >= ``pseudo_threshold`` (:func:`pseudo_labels`; DAFormer's code takes the share over
the whole batch: ``pseudo_weight="batch"``); ClassMix pastes half of each source image's classes
onto its target image (mixed label: source inside the mask, pseudo-label outside; weight 1 inside,
the pseudo weight outside), then colour jitter and Gaussian blur; weighted CE on the mixed batch
(backward); one optimiser step. The teacher runs without gradients and with dropout off; its BN
layers use the target batch's statistics (``teacher_bn="batch"``: DAFormer never puts its EMA
model in eval mode) or the EMA of the student's running statistics (``"running"``). The student is
returned (DAFormer evaluates it).

Source images are drawn by rare-class sampling (:func:`rcs_class_probs`, ``uda_dataset.py``):
``f_c`` = share of class ``c`` among all labelled source pixels, ``P(c) = softmax((1 - f_c) / T)``,
``T = 0.01``, then uniformly one of the images with more than ``rcs_min_pixels`` pixels of ``c``.
DAFormer's 3,000 pixels are counted on 1914x1052 GTA5 labels (0.15% of an image); ``None`` scales
them to our image size (6 pixels at 64x64). Classes no image has enough of are left out and the
others' probabilities renormalised (DAFormer asserts). ``rcs_temperature=None`` draws source images
uniformly. Target images come in shuffled passes. Left out: the ImageNet feature distance (needs
ImageNet weights, which cannot be downloaded here), the pseudo-weight crop of the GTA ego-car rows
(``croppl``), RCS's re-crop.

Defaults, measured on ``streets`` with ``deeplab_mini`` (``benchmarks/seg_adaptation_check.py``,
whose docstring has the numbers): lr 5e-3 for both stages (head 5e-2), ~80x DAFormer's 6e-5,
because our network starts from scratch (no ImageNet weights) and runs hundreds of steps, not 40k;
``alpha`` 0.99 (0.9 / 0.99 / 0.999 within a point at 200 steps); ``teacher_bn="batch"`` (an
eval-mode teacher with the student's running statistics collapsed below the source model);
the dataclass defaults are the ``quick`` budget (600 source steps, 400 DACS steps: +8 mIoU on
``city``, +14 on ``india``). Longer source training is not better for adaptation: from a source
trained 2,400 steps DACS lost up to 4 points on ``city`` for one seed in three.

Budgets count optimizer steps (:func:`mergeq.adapt.source.train_steps`). All draws come from one
CPU ``torch.Generator(seed)``; dropout, which draws from torch's global generator, runs inside
``torch.random.fork_rng`` seeded with ``seed`` (the caller's global state is restored). The same
seed gives a bit-identical model on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data_utils import take
from ..errors import ConfigError, MergeqError, ModelError
from ..typed import from_mapping
from .seg_augment import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, class_mix, class_mix_masks, color_jitter,
                          flip_scale_crop, gaussian_blur)
from .source import optimizer_step, passes, step_bar, train_steps

log = logging.getLogger(__name__)

WARMUP_RATIO = 1e-6  # mmcv's lr at step 0 of the linear warm-up, as a share of the scheduled lr
RCS_REFERENCE = (3000, 1914 * 1052)  # DAFormer's min_pixels and the GTA5 label size it counts on


@dataclass
class SegSourceConfig:
    epochs: int = 8  # passes over the source data, when steps is None (600 steps on streets' 600 images)
    steps: int | None = None  # optimizer steps (None: train_steps' rule)
    min_steps: int = 100  # the floor of the epoch rule
    batch_size: int = 8
    lr: float = 5e-3  # DAFormer: 6e-5 (ImageNet-initialised MiT-B5); ours trains from scratch (docstring)
    head_lr_mult: float = 10.0  # lr multiplier of the parameters under head_prefix
    head_prefix: str = "decode_head"  # dotted-name prefix of the decode head's parameters (mmseg's name)
    weight_decay: float = 0.01
    warmup: float = 0.0375  # share of the steps in linear warm-up (DAFormer: 1,500 of 40,000)
    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.5)  # random zoom range, cropped back to the image size


@dataclass
class DACSConfig(SegSourceConfig):
    steps: int | None = 400  # optimizer steps (DAFormer counts iterations; None: epochs over the target)
    alpha: float = 0.99  # teacher EMA ceiling (DAFormer 0.999 at 40k steps; base config 0.99)
    pseudo_threshold: float = 0.968
    pseudo_weight: Literal["image", "batch"] = "image"  # share of confident pixels per image / batch
    teacher_bn: Literal["batch", "running"] = "batch"
    jitter_strength: float = 0.2
    jitter_p: float = 0.8  # probability of jittering (DAFormer's code: U > 0.2)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    rcs_temperature: float | None = 0.01  # None: source images drawn uniformly
    rcs_min_pixels: int | None = None  # None: DAFormer's 3,000 of 1914x1052 scaled to the image size
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # the normalisation colour jitter undoes
    image_std: tuple[float, float, float] = IMAGENET_STD


def _check(cfg: SegSourceConfig, where: str) -> None:
    from_mapping(type(cfg), dataclasses.asdict(cfg), where)
    bad = [(k, v) for k, v in (("batch_size", cfg.batch_size), ("head_lr_mult", cfg.head_lr_mult))
           if not v > 0] + [(k, v) for k, v in (("warmup", cfg.warmup),) if not 0 <= v < 1]
    lo, hi = cfg.scale
    if not 0 < lo <= hi:
        bad.append(("scale", cfg.scale))
    if isinstance(cfg, DACSConfig):
        bad += [(k, v) for k, v in (("alpha", cfg.alpha), ("pseudo_threshold", cfg.pseudo_threshold),
                                    ("jitter_p", cfg.jitter_p), ("blur_p", cfg.blur_p)) if not 0 <= v <= 1]
        if not 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1]:
            bad.append(("blur_sigma", cfg.blur_sigma))
        if cfg.rcs_temperature is not None and not cfg.rcs_temperature > 0:
            bad.append(("rcs_temperature", cfg.rcs_temperature))
        if cfg.rcs_min_pixels is not None and cfg.rcs_min_pixels < 0:
            bad.append(("rcs_min_pixels", cfg.rcs_min_pixels))
    if bad:
        k, v = bad[0]
        raise ConfigError(f"{where}.{k}: out of range (see {type(cfg).__name__}), got {v!r}")


def warmup_poly_lr(base: float, step: int, total: int, warmup_steps: int, power: float = 1.0,
                   warmup_ratio: float = WARMUP_RATIO) -> float:
    """mmcv's ``poly`` lr with ``linear`` warm-up at 0-based ``step`` of ``total``:
    ``base * (1 - step/total)^power``, times ``1 - (1 - step/warmup_steps)(1 - warmup_ratio)``
    while ``step < warmup_steps``."""
    lr = base * (1 - step / total) ** power
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def param_groups(model: nn.Module, head_prefix: str, head_lr_mult: float) -> list[dict]:
    """AdamW groups: the rest at lr multiplier 1, the parameters named ``head_prefix[.…]`` at
    ``head_lr_mult``. A multiplier other than 1 with no such parameter is a ConfigError."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name == head_prefix or name.startswith(head_prefix + ".") else rest).append(p)
    if not head and head_lr_mult != 1:
        children = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"head_prefix: no parameter of {type(model).__name__} is named {head_prefix!r}.*; "
                          f"expected one of its modules ({children})")
    return [{"params": rest, "lr_mult": 1.0}, {"params": head, "lr_mult": float(head_lr_mult)}]


def _optimizer(model: nn.Module, cfg: SegSourceConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.head_prefix, cfg.head_lr_mult), lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, cfg: SegSourceConfig, step: int, total: int) -> None:
    lr = warmup_poly_lr(cfg.lr, step, total, round(cfg.warmup * total))
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_mult"]


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg's per-pixel cross-entropy: ``mean over all pixels of weight * CE`` (ignored pixels 0).

    ``logits [N, C, H, W]``, ``labels [N, H, W]`` (ids in ``[0, C)`` or ``ignore_index``), ``weight``
    broadcastable to ``[N, H, W]``."""
    if logits.dim() != 4 or logits.shape[:1] + logits.shape[2:] != labels.shape:
        raise ModelError(f"expected logits [N, C, H, W] at the label size {tuple(labels.shape)} (upsampled "
                         f"inside the model), got {tuple(logits.shape)}")
    valid = labels[labels != ignore_index]
    if len(valid) and (valid.min() < 0 or valid.max() >= logits.shape[1]):
        raise MergeqError(f"labels must be class ids in [0, {logits.shape[1]}) or {ignore_index}, "
                          f"found {valid.unique()[:8].tolist()}")
    loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    return (loss if weight is None else loss * weight).mean()


@contextlib.contextmanager
def _seeded_dropout(seed: int, device: str):
    """torch's global generators (CPU and ``device``'s) seeded with ``seed``, restored on exit."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _labeled_batch(data: Dataset, idx: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = take(data, idx)
    if y is None:
        raise MergeqError(f"{what} needs labelled data: (image, label map) items")
    return x, y


def train_seg_source(model: nn.Module, dataset: Dataset, cfg: SegSourceConfig, seed: int = 0,
                     device: str = "cpu", progress: bool = False) -> nn.Module:
    """Train a copy of ``model`` on ``dataset`` of (image ``[3,H,W]``, label ``[H,W]``) items with
    per-pixel CE (module docstring); returns it in eval mode."""
    _check(cfg, "seg_source")
    n = len(dataset)
    if n == 0:
        raise MergeqError("train_seg_source needs a non-empty labelled source dataset")
    model = copy.deepcopy(model).to(device).train()
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, cfg)
    total, step, bs = train_steps(cfg, n), 0, cfg.batch_size
    bar = step_bar(progress, total, "seg source")
    with _seeded_dropout(seed, device):
        for k, steps in passes(n, bs, total):
            perm = torch.randperm(n, generator=g)
            running = torch.zeros((), device=device)
            for i in range(steps):
                x, y = flip_scale_crop(*_labeled_batch(dataset, perm[i * bs:(i + 1) * bs], "train_seg_source"), g,
                                       cfg.flip, cfg.scale)
                _set_lr(opt, cfg, step, total)
                loss = seg_cross_entropy(model(x.to(device)), y.to(device))
                running += optimizer_step(opt, loss)
                step += 1
                if bar is not None:
                    bar.update()
            log.debug("seg source pass %d: step %d/%d, loss %.4f", k + 1, step, total, float(running) / steps)
    if bar is not None:
        bar.close()
    log.info("segmentation source training: %d steps over %d images, last pass loss %.4f",
             total, n, float(running) / steps)
    return model.eval()


def ema_alpha(step: int, alpha: float) -> float:
    """DAFormer's teacher momentum at step ``step``: ``min(1 - 1/(step+1), alpha)``."""
    return min(1 - 1 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, alpha: float, buffers: bool = False) -> None:
    """``teacher = a * teacher + (1 - a) * student`` over the parameters (and the float buffers when
    ``buffers``; other buffers are copied), ``a = ema_alpha(step, alpha)``."""
    a = ema_alpha(step, alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(a * t + (1 - a) * s)
    if buffers:
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(a * t + (1 - a) * s if t.is_floating_point() else s)


def pseudo_labels(logits: torch.Tensor, threshold: float, per: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N, H, W], weight [N])``: the argmax of ``softmax(logits)`` and the share of pixels
    whose max probability is >= ``threshold``, per image (``per="image"``) or over the batch."""
    prob, label = logits.detach().softmax(dim=1).max(dim=1)
    confident = (prob >= threshold).to(logits.dtype)
    weight = confident.mean(dim=(1, 2)) if per == "image" else confident.mean().expand(len(logits))
    return label, weight


def class_pixel_counts(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[N, K]`` int64: pixels of each class id ``0..K-1`` per label map (``K`` = 1 + the largest id)."""
    flat = labels.reshape(len(labels), -1).long()
    valid = flat != ignore_index
    if (flat[valid] < 0).any():
        raise MergeqError(f"labels must be class ids >= 0 or {ignore_index}")
    k = int(flat[valid].max()) + 1 if valid.any() else 0
    rows = torch.arange(len(flat)).unsqueeze(1).expand_as(flat)[valid]
    return torch.bincount(rows * k + flat[valid], minlength=len(flat) * k).view(len(flat), k)


def rcs_class_probs(pixels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes, probs)``: the classes with pixels and ``softmax((1 - f_c) / T)`` over them, with
    ``f_c`` their share of ``pixels [K]`` (DAFormer's ``get_rcs_class_probs``)."""
    classes = (pixels > 0).nonzero().flatten()
    freq = pixels[classes].double() / pixels.sum()
    return classes, ((1 - freq) / temperature).softmax(dim=0)


class _RareClassSampler:
    """Draws source image indices: a class by :func:`rcs_class_probs`, then an image with more
    than ``min_pixels`` of it, uniformly; uniform images when ``temperature`` is None."""

    def __init__(self, counts: torch.Tensor, temperature: float | None, min_pixels: int) -> None:
        self.n = len(counts)
        self.images: list[torch.Tensor] = []
        if temperature is None:
            return
        rich = counts > min_pixels
        classes, probs = rcs_class_probs(counts.sum(dim=0), temperature)
        keep = rich[:, classes].any(dim=0)
        self.classes, self.probs = classes[keep], probs[keep] / probs[keep].sum()
        self.images = [rich[:, c].nonzero().flatten() for c in self.classes.tolist()]
        if not self.images:
            log.warning("RCS: no source image has more than %d pixels of any class; drawing uniformly", min_pixels)
        log.info("RCS: classes %s, probabilities %s", self.classes.tolist(), [round(p, 4) for p in self.probs.tolist()])

    def draw(self, k: int, g: torch.Generator) -> torch.Tensor:
        if not self.images:
            return torch.randint(self.n, (k,), generator=g)
        cls = torch.multinomial(self.probs, k, replacement=True, generator=g)
        return torch.stack([self.images[c][torch.randint(len(self.images[c]), (1,), generator=g)][0] for c in cls])


def _rcs_sampler(dataset: Dataset, cfg: DACSConfig, chunk: int = 256) -> _RareClassSampler:
    """The sampler of ``cfg`` over the labels of ``dataset``, read in chunks."""
    parts = [class_pixel_counts(_labeled_batch(dataset, torch.arange(i, min(i + chunk, len(dataset))), "dacs")[1])
             for i in range(0, len(dataset), chunk)]
    k = max(p.shape[1] for p in parts)
    counts = torch.cat([F.pad(p, (0, k - p.shape[1])) for p in parts])
    min_px = cfg.rcs_min_pixels
    if min_px is None:
        h, w = take(dataset, [0])[0].shape[-2:]
        min_px = round(RCS_REFERENCE[0] * h * w / RCS_REFERENCE[1])
    return _RareClassSampler(counts, cfg.rcs_temperature, min_px)


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor, bn: str) -> torch.Tensor:
    teacher.train(bn == "batch")
    for m in teacher.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return teacher(x)


def _dacs_step(student: nn.Module, teacher: nn.Module, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor,
               cfg: DACSConfig, g: torch.Generator) -> torch.Tensor:
    """Source CE and ClassMix CE of one DACS step, both backpropagated; returns the two losses."""
    src_loss = seg_cross_entropy(student(xs), ys)
    src_loss.backward()
    label, weight = pseudo_labels(_teacher_logits(teacher, xt, cfg.teacher_bn), cfg.pseudo_threshold,
                                  cfg.pseudo_weight)
    mixed, mix_label, mix_weight = class_mix(class_mix_masks(ys, g), xs, ys, xt, label, weight)
    mixed = gaussian_blur(color_jitter(mixed, g, cfg.jitter_strength, cfg.jitter_p, cfg.image_mean, cfg.image_std),
                          g, cfg.blur_p, cfg.blur_sigma)
    mix_loss = seg_cross_entropy(student(mixed), mix_label, mix_weight)
    mix_loss.backward()
    return torch.stack([src_loss.detach(), mix_loss.detach()])


def dacs(source_model: nn.Module, source_train: Dataset, target_train: Dataset, cfg: DACSConfig,
         seed: int = 0, device: str = "cpu", progress: bool = False) -> nn.Module:
    """Adapt a copy of ``source_model`` to the unlabelled ``target_train`` images by DACS self-training
    with the labelled ``source_train`` (module docstring); returns the student in eval mode."""
    _check(cfg, "dacs")
    n_src, n_tgt = len(source_train), len(target_train)
    if n_src == 0 or n_tgt == 0:
        raise MergeqError(f"dacs needs non-empty source and target data, got {n_src} source and {n_tgt} target images")
    sampler = _rcs_sampler(source_train, cfg)
    student = copy.deepcopy(source_model).to(device).train()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(student, cfg)
    total, step, bs = train_steps(cfg, n_tgt), 0, cfg.batch_size
    bar = step_bar(progress, total, "dacs")
    with _seeded_dropout(seed, device):
        for k, steps in passes(n_tgt, bs, total):
            perm = torch.randperm(n_tgt, generator=g)
            running = torch.zeros(2, device=device)
            for i in range(steps):
                if step > 0:
                    ema_update(teacher, student, step, cfg.alpha, buffers=cfg.teacher_bn == "running")
                xt, _ = flip_scale_crop(take(target_train, perm[i * bs:(i + 1) * bs])[0], None, g, cfg.flip,
                                        cfg.scale)
                xs, ys = flip_scale_crop(*_labeled_batch(source_train, sampler.draw(len(xt), g), "dacs"), g,
                                         cfg.flip, cfg.scale)
                _set_lr(opt, cfg, step, total)
                opt.zero_grad(set_to_none=True)
                running += _dacs_step(student, teacher, xs.to(device), ys.to(device), xt.to(device), cfg, g)
                opt.step()
                step += 1
                if bar is not None:
                    bar.update()
            log.debug("dacs pass %d: step %d/%d, source loss %.4f, mix loss %.4f", k + 1, step, total,
                      *(running / steps).tolist())
    if bar is not None:
        bar.close()
    log.info("DACS: %d steps (%d passes over %d target images), last pass source loss %.4f, mix loss %.4f",
             total, k + 1, n_tgt, *(running / steps).tolist())
    return student.eval()
