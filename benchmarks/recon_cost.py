"""Cost of one reconstruction step relative to one FP forward+backward of the same unit.

For every unit of a ResNet-8 (width 16, 32x32 inputs; blocks for brecq/qdrop/hdrq, single
layers for adaround) time ``reconstruct_unit`` for ``--iters`` steps and one plain
full-precision forward + backward (squared-error loss) of the same unit on the same batch,
and print the ratio averaged over units plus the mean absolute step time.

    PYTHONPATH=src python benchmarks/recon_cost.py [--iters 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from mergeq.models.resnet import resnet8
from mergeq.nn import calibrate_activations, fold_bn, prepare, quant_modules
from mergeq.nn.blocks import partition
from mergeq.ptq.adaround import AdaRoundHooks, AdaRoundOptions
from mergeq.ptq.hdrq import HDRQHooks, HDRQOptions
from mergeq.ptq.recon import capture, rec_loss, reconstruct_unit
from mergeq.quant.config import QuantConfig


def hooks_for(method: str, iters: int, bs: int, source):
    if method == "hdrq":
        o = HDRQOptions(iters=iters, batch_size=bs)
        return HDRQHooks(o, source), o
    o = AdaRoundOptions(iters=iters, batch_size=bs, drop_prob=0.5 if method == "qdrop" else 0.0)
    return AdaRoundHooks(o, learn_act=method != "adaround", quant_act=method != "adaround"), o


def fp_step_time(unit, x, y, reps: int) -> float:
    unit = copy.deepcopy(unit).requires_grad_(True)
    t = time.perf_counter()
    for _ in range(reps):
        unit.zero_grad(set_to_none=True)
        rec_loss(unit(x), y).backward()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet8(10, 16).eval()
    calib = torch.randn(128, 3, 32, 32)
    fp = fold_bn(model, calib[:2]).requires_grad_(False)
    q = prepare(model, QuantConfig(w_bits=4, a_bits=4), calib[:2])
    calibrate_activations(q, calib)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, {args.iters} steps per unit")
    print(f"{'method':9s} {'units':>5s} {'step ms':>8s} {'fp f+b ms':>9s} {'ratio':>6s}")
    for method in ("adaround", "brecq", "qdrop", "hdrq"):
        rec, base = [], []
        for name, unit in partition(q, calib[:2], layerwise=method == "adaround"):
            x_q, _ = capture(q, name, calib, 128, "cpu", output=False)
            x_fp, y_fp = capture(fp, name, calib, 128, "cpu", output=True)
            u = copy.deepcopy(unit)
            layers = [(f"{name}.{n}" if n else name, m) for n, m in quant_modules(u)]
            hooks, opts = hooks_for(method, args.iters, args.batch, fp)
            torch.manual_seed(0)
            t = time.perf_counter()
            reconstruct_unit(u, layers, (x_q, x_fp, y_fp), hooks, opts, "cpu")
            rec.append((time.perf_counter() - t) / args.iters)
            base.append(fp_step_time(fp.get_submodule(name), x_fp[: args.batch], y_fp[: args.batch], args.iters))
        ratio = sum(r / b for r, b in zip(rec, base)) / len(rec)
        print(f"{method:9s} {len(rec):5d} {1e3 * sum(rec) / len(rec):8.2f} {1e3 * sum(base) / len(base):9.2f} "
              f"{ratio:6.2f}")


if __name__ == "__main__":
    main()
