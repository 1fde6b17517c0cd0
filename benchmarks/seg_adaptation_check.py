"""Does DACS beat the source-only model on each ``streets`` target, and at what cost?

Per seed: build the benchmark, train ``deeplab_mini`` on the source (``train_seg_source``), score
it (mIoU, :func:`mergeq.eval.segmentation.mean_iou`) on the source test split and every target's
test split, adapt one DACS expert per target and score it on its own target; then the per-target
gain (expert - source-only) with its mean and 95% Student-t interval over the seeds, and the time
of each stage. ``--budget quick`` / ``default`` pick the step counts below. ``exp+bn``: the expert
with its BN statistics re-estimated on the target's train images (AdaBN; not part of DACS).

    PYTHONPATH=src python benchmarks/seg_adaptation_check.py --budget quick --seeds 0 1 2 --threads 1 \\
        --cache-dir ~/.cache/mergeq

Measured (streets as of commit 1822f62, ``deeplab_mini`` width 16, seeds 0-2, mIoU in points, CPU
"AMD EPYC" with AVX-512 + VNNI, one thread per process, two processes sharing the 2 cores)::

    budget (source / DACS steps)   target  source-only  expert  gain, mean [95% t]   time: source, per expert
    quick (600 / 400)              city        34.6      42.6    +8.0 [+5.3, +10.7]   32-36 s, 52-56 s
                                   india       13.5      27.6   +14.1 [+7.4, +20.8]
    default (1,200 / 1,600)        city        35.9      46.6   +10.7 [+9.0, +12.4]   33-76 s, 102-236 s
                                   india       13.7      29.9   +16.3 [+5.8, +26.8]
    600 / 1,600                    city        34.6      46.7   +12.1 [+9.9, +14.3]
                                   india       13.5      27.3   +13.8 [+7.8, +19.8]
    2,400 / 1,600 (rejected)       city        37.7      42.4    +4.7 [-13.5, +23.0]  seed 2: -3.8
                                   india       14.4      30.9   +16.5 [+13.3, +19.7]

Every seed gains at quick and default. On an idle core quick takes 17 s + 36 s. A source trained
2,400 steps (78% on its own test split, 71% at 600) is confidently wrong on ``city`` (sky taken for
building) and DACS amplifies it: seed 2 lost 3.8 points (alpha 0.999: 2.3), seed 0 lost 1.4-2.6 at
400-800 DACS steps at any lr in 1e-3..5e-3. ``exp+bn`` (AdaBN after DACS) adds 0.6-3.7 points more.

Choices, measured on seed 0 of an earlier streets version (one run each; ``india``, 200 DACS steps
from a 600-step source unless said): DACS lr 2e-3 / 5e-3 / 1e-2: 22.9 / 24.5 / 25.1 mIoU (source
11.5); alpha 0.9 / 0.99 / 0.999: 25.3 / 24.5 / 24.5; pseudo_threshold 0.9: 24.6; no RCS: 21.5;
``teacher_bn="running"`` on ``city``: 5.7 against 24.1 with ``"batch"`` (source-only 9.0).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from mergeq.adapt.segmentation import DACSConfig, SegSourceConfig, dacs, train_seg_source
from mergeq.adapt.shot import recalibrate_batchnorm
from mergeq.data.streets import load_streets_benchmark
from mergeq.eval.segmentation import mean_iou
from mergeq.models import build_model
from mergeq.sysinfo import cpu

BUDGETS = {  # (source steps, DACS steps per target); quick = the configs' defaults on streets
    "quick": (None, 400),
    "default": (1200, 1600),
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run(budget: str, seed: int, targets, width: int, src_over: dict, dacs_over: dict, cache_dir) -> dict:
    src_steps, dacs_steps = BUDGETS[budget]
    src_cfg = dataclasses.replace(SegSourceConfig(steps=src_steps), **src_over)
    dacs_cfg = dataclasses.replace(DACSConfig(steps=dacs_steps), **dacs_over)
    t0 = time.perf_counter()
    bench = load_streets_benchmark(seed=seed, targets=targets, cache_dir=cache_dir)
    res = {"seed": seed, "t_data": time.perf_counter() - t0}
    torch.manual_seed(seed)
    model = build_model("deeplab_mini", bench.num_classes, width=width)
    t0 = time.perf_counter()
    source = train_seg_source(model, bench.source.train, src_cfg, seed)
    res["t_source"] = time.perf_counter() - t0
    res["src@source"] = mean_iou(source, bench.source.test, bench.num_classes)["miou"]
    for name, dom in bench.targets.items():
        res[f"src@{name}"] = mean_iou(source, dom.test, bench.num_classes)["miou"]
        t0 = time.perf_counter()
        expert = dacs(source, bench.source.train, dom.train, dacs_cfg, seed)
        res[f"t_dacs@{name}"] = time.perf_counter() - t0
        res[f"exp@{name}"] = mean_iou(expert, dom.test, bench.num_classes)["miou"]
        res[f"gain@{name}"] = res[f"exp@{name}"] - res[f"src@{name}"]
        recalibrate_batchnorm(expert, dom.train)  # not DACS: how much target BN statistics add
        res[f"exp+bn@{name}"] = mean_iou(expert, dom.test, bench.num_classes)["miou"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", nargs="+", default=None)
    ap.add_argument("--width", type=int, default=16, help="deeplab_mini width")
    ap.add_argument("--source", default="{}", help="JSON overrides of SegSourceConfig fields")
    ap.add_argument("--dacs", default="{}", help="JSON overrides of DACSConfig fields")
    ap.add_argument("--cache-dir", default=None, help="where the streets benchmark is cached (default: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    src_over, dacs_over = json.loads(args.source), json.loads(args.dacs)
    for key in ("scale", "blur_sigma", "image_mean", "image_std"):
        for over in (src_over, dacs_over):
            if key in over:
                over[key] = tuple(over[key])
    print(f"# {cpu()['model']}, {torch.get_num_threads()} thread(s), budget {args.budget} "
          f"{BUDGETS[args.budget]}, width {args.width}, source {src_over}, dacs {dacs_over}")
    rows = [run(args.budget, s, args.targets, args.width, src_over, dacs_over, args.cache_dir) for s in args.seeds]
    for k in rows[0]:
        vals = [r[k] for r in rows]
        line = f"{k:14s}" + "".join(f"{v:8.3f}" if isinstance(v, float) else f"{v:8d}" for v in vals)
        if k.startswith("gain@") and len(vals) > 1:
            m, sd = statistics.mean(vals), statistics.stdev(vals)
            half = T95.get(len(vals) - 1, 1.96) * sd / len(vals) ** 0.5
            line += f"   mean {m:+.3f}  95% CI [{m - half:+.3f}, {m + half:+.3f}]"
        print(line)


if __name__ == "__main__":
    main()
