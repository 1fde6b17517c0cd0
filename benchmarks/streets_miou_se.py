"""Bootstrap standard error of the ``streets`` test mIoU, per domain: are the test splits large enough?

Trains ``deeplab_mini`` on the source (``train_seg_source``) and adapts one DACS expert per target
(``dacs``), the models the segmentation pipeline scores; then, per test split, the mIoU of the
source-only model and of the target's expert, and the SE of each: the standard deviation of the
mIoU over ``--resamples`` bootstrap resamples of the test images (areas pooled over the resampled
images as :mod:`mergeq.eval.segmentation` pools them). Also the shares of ignored and thing pixels.
The requirement (issue 29) is SE <= 0.005 on every target.

    PYTHONPATH=src python benchmarks/streets_miou_se.py --seed 0 --threads 2 --cache-dir ~/.cache/mergeq

Measured (AMD EPYC, 2 threads, seed 0, width 16, 1,000 resamples; ``--source-steps 2000
--dacs-steps 600``, about 21 minutes on a busy 2-core machine; per-class IoU columns left out)::

    model        domain      test  ignored  things    mIoU      SE
    source-only  synthetic    300    0.048   0.037   0.761  0.0037
    source-only  city         500    0.052   0.033   0.368  0.0038
    source-only  india        500    0.049   0.042   0.136  0.0031
    DACS expert  city         500    0.052   0.033   0.435  0.0036
    DACS expert  india        500    0.049   0.042   0.279  0.0031

With 600 / 300 steps (the defaults, about 7 minutes): SE 0.0025-0.0033, mIoU 0.303 -> 0.386
(city) and 0.128 -> 0.236 (india), source-only -> DACS. Person / car IoU stay low (<= 0.35 even
on the source after 2,000 steps): digits are the hard classes for this small model.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergeq.adapt.segmentation import DACSConfig, SegSourceConfig, dacs, train_seg_source
from mergeq.data.streets import CLASSES, IGNORE_INDEX, load_streets_benchmark
from mergeq.eval.segmentation import intersect_and_union
from mergeq.models import build_model
from mergeq.sysinfo import cpu


@torch.no_grad()
def per_image_areas(model: nn.Module, data: TensorDataset, num_classes: int, batch: int = 64) -> np.ndarray:
    """``N x 2 x C`` float64: each test image's intersection and union areas."""
    x, y = data.tensors
    out = []
    for i in range(0, len(x), batch):
        pred = model(x[i:i + batch]).argmax(1)
        for p, t in zip(pred, y[i:i + batch]):
            inter, union, _, _ = intersect_and_union(p, t, num_classes, IGNORE_INDEX)
            out.append(torch.stack([inter, union]).numpy())
    return np.stack(out)


def miou(areas: np.ndarray) -> np.ndarray:
    """mIoU of pooled areas ``... x 2 x C`` (nanmean over classes with a union)."""
    inter, union = areas[..., 0, :], areas[..., 1, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(union > 0, inter / union, np.nan), axis=-1)


def bootstrap_se(areas: np.ndarray, resamples: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    n = len(areas)
    stats = [miou(areas[rng.integers(0, n, n)].sum(0)) for _ in range(resamples)]
    return float(np.std(stats, ddof=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source-steps", type=int, default=600)
    ap.add_argument("--dacs-steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bench = load_streets_benchmark(seed=args.seed, cache_dir=args.cache_dir)
    print(f"# {cpu()['model']}, {torch.get_num_threads()} thread(s), data {time.perf_counter() - t0:.1f} s, "
          f"seed {args.seed}, source {args.source_steps} steps, DACS {args.dacs_steps}, width {args.width}, "
          f"{args.resamples} resamples")
    torch.manual_seed(args.seed)
    model = build_model("deeplab_mini", bench.num_classes, width=args.width)
    t0 = time.perf_counter()
    source = train_seg_source(model, bench.source.train, SegSourceConfig(steps=args.source_steps), args.seed)
    print(f"# source training {time.perf_counter() - t0:.0f} s")
    models = {"source-only": {d: source for d in [bench.source.name, *bench.targets]}}
    if args.dacs_steps:
        t0 = time.perf_counter()
        models["DACS expert"] = {d: dacs(source, bench.source.train, dom.train, DACSConfig(steps=args.dacs_steps),
                                         args.seed) for d, dom in bench.targets.items()}
        print(f"# DACS {time.perf_counter() - t0:.0f} s for {len(bench.targets)} targets")
    print(f"{'model':12s} {'domain':10s} {'test':>5s} {'ignored':>8s} {'things':>7s} {'mIoU':>7s} {'SE':>7s}  "
          + " ".join(f"{c[:6]:>6s}" for c in CLASSES))
    for label, per_domain in models.items():
        for dom in [bench.source, *bench.targets.values()]:
            if dom.name not in per_domain:
                continue
            y = dom.test.tensors[1]
            areas = per_image_areas(per_domain[dom.name], dom.test, bench.num_classes)
            pooled = areas.sum(0)
            iou = pooled[0] / np.maximum(pooled[1], 1)
            things = float(((y >= CLASSES.index("person")) & (y != IGNORE_INDEX)).float().mean())
            print(f"{label:12s} {dom.name:10s} {len(y):5d} {float((y == IGNORE_INDEX).float().mean()):8.3f} "
                  f"{things:7.3f} {float(miou(pooled)):7.3f} "
                  f"{bootstrap_se(areas, args.resamples, args.seed):7.4f}  " + " ".join(f"{v:6.3f}" for v in iou))


if __name__ == "__main__":
    main()
