"""Cost of one reconstruction step relative to one plain FP forward+backward of the same unit.

For every unit of a CIFAR ResNet (width 16, 32x32 inputs; blocks for brecq/qdrop/hdrq/ttaq,
single layers for adaround) time ``reconstruct_unit`` for ``--iters`` steps and a plain
full-precision forward + backward (squared-error loss, no optimizer) of the same unit on
batches of the same size, interleaved in one run. Per method it prints

* ``ratio``: Σ_units step time / Σ_units FP forward+backward time (the cost of reconstructing
  the whole model relative to training it in full precision for as many steps),
* the same against an FP forward+backward that also computes the unit input's gradient: a
  method that learns the step of a quantizer reading the unit's input (all but AdaRound here)
  needs that gradient, which the plain reference does not compute, and
* ``max unit``: the largest per-unit ratio with its unit (the classifier head of 64 x 10
  weights costs 0.05 ms to run forward+backward, so any fixed per-step work dominates it).

Times are CPU time of the process (``time.process_time``), the minimum over ``--repeat``
alternating measurements of the step and of the FP forward+backward, so that other load on a
shared machine distorts them as little as possible; each measurement follows a few untimed
warm-up steps (oneDNN primitive creation, allocator growth). ``--profile UNIT`` instead runs torch.profiler (wall
clock) over the steps of one unit per method and prints where the time goes, by operator.

``--baseline OLD/src`` measures another checkout (e.g. ``git worktree add /tmp/old d688ed4``)
and this one in alternating subprocesses, the same settings for both, and prints the ratios
before and after side by side (the FP reference is the minimum of both sides' measurements).
``benchmarks/recon_ab.py`` does the same in one process (the old package imported under
another name), steadier on a machine other jobs share.

    PYTHONPATH=src python benchmarks/recon_cost.py --threads 1
    PYTHONPATH=src python benchmarks/recon_cost.py --threads 1 --baseline /tmp/old/src
    PYTHONPATH=src python benchmarks/recon_cost.py --threads 1 --model resnet20 --profile layer2.1
    PYTHONPATH=src python benchmarks/recon_cost.py --threads 1 --methods qdrop --compile layer2.0
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergeq.models.resnet import resnet8, resnet20
from mergeq.nn import calibrate_activations, fold_bn, prepare, quant_modules
from mergeq.nn.blocks import partition
from mergeq.ptq.adaround import AdaRoundHooks, AdaRoundOptions
from mergeq.ptq.hdrq import HDRQHooks, HDRQOptions
from mergeq.ptq.recon import capture, reconstruct_unit
from mergeq.ptq.ttaq import TTAQHooks, TTAQOptions
from mergeq.quant.config import QuantConfig

METHODS = ("adaround", "brecq", "qdrop", "hdrq", "ttaq")
WARMUP = 5
MODELS = {"resnet8": resnet8, "resnet20": resnet20}


def hooks_for(method: str, iters: int, bs: int, source, graphs: bool = True):
    """The method's hooks and options (``graphs``: steps as CUDA graphs on a CUDA device)."""
    if method == "hdrq":
        o = HDRQOptions(iters=iters, batch_size=bs, cuda_graphs=graphs)
        return HDRQHooks(o, source), o
    if method == "ttaq":
        o = TTAQOptions(iters=iters, batch_size=bs, cuda_graphs=graphs)
        return TTAQHooks(o), o
    o = AdaRoundOptions(iters=iters, batch_size=bs, drop_prob=0.5 if method == "qdrop" else 0.0, cuda_graphs=graphs)
    return AdaRoundHooks(o, learn_act=method != "adaround", quant_act=method != "adaround"), o


def plain_loss(out, y):
    """BRECQ's reconstruction error, written out so that every version of mergeq is measured
    against the same reference."""
    return (out - y).pow(2).sum(1).mean()


def fp_step_time(unit, x, y, reps: int, input_grad: bool = False) -> float:
    """Seconds per plain FP forward + backward (squared error) of ``unit`` on batches of ``x``
    (``input_grad``: also the gradient of the unit's input, which learning a quantizer that
    reads the input needs)."""
    unit = copy.deepcopy(unit).requires_grad_(True)
    bs = len(x) // 4

    def run(n: int) -> None:
        for i in range(n):
            j = (i % 4) * bs
            unit.zero_grad(set_to_none=True)
            plain_loss(unit(x[j : j + bs].requires_grad_(input_grad)), y[j : j + bs]).backward()

    run(WARMUP)
    t = time.process_time()
    run(reps)
    return (time.process_time() - t) / reps


def setup(model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[model_name](10, 16).eval()
    calib = torch.randn(256, 3, 32, 32)
    fp = fold_bn(model, calib[:2]).requires_grad_(False)
    q = prepare(model, QuantConfig(w_bits=4, a_bits=4), calib[:2])
    calibrate_activations(q, calib)
    return fp, q, calib


def unit_jobs(method: str, fp, q, calib, only: str | None = None, device="cpu"):
    """(name, unit copy, layers, data, fp unit) for every unit of ``method``'s partition (the
    models on ``device``, the captured data on the CPU)."""
    for name, unit in partition(q, calib[:2].to(device), layerwise=method == "adaround"):
        if only is not None and name != only and not name.startswith(only + "."):
            continue
        x_q, _ = capture(q, name, calib, 128, device, output=False)
        x_fp, y_fp = capture(fp, name, calib, 128, device, output=True)
        yield name, copy.deepcopy(unit), (x_q, x_fp, y_fp), fp.get_submodule(name)


def run_unit(method: str, name: str, unit, data, iters: int, bs: int, source, device="cpu", graphs: bool = True):
    """``unit`` reconstructed in place by ``method`` for ``iters`` steps; returns it."""
    hooks, opts = hooks_for(method, iters, bs, source, graphs)
    layers = [(f"{name}.{n}" if n else name, m) for n, m in quant_modules(unit)]
    reconstruct_unit(unit, layers, data, hooks, opts, device)
    return unit


def measure(method: str, fp, q, calib, iters: int, bs: int, repeat: int):
    """[(unit, step s, FP f+b s, FP f+b with input gradient s)]: each the minimum over ``repeat``
    alternating measurements."""
    jobs = list(unit_jobs(method, fp, q, calib))
    best = {name: [float("inf")] * 3 for name, *_ in jobs}
    for _ in range(repeat):
        for name, u, data, fp_unit in jobs:
            run_unit(method, name, copy.deepcopy(u), data, WARMUP, bs, fp)
            torch.manual_seed(0)
            t = time.process_time()
            run_unit(method, name, copy.deepcopy(u), data, iters, bs, fp)
            best[name][0] = min(best[name][0], (time.process_time() - t) / iters)
            x, y = data[1][: 4 * bs].clone(), data[2][: 4 * bs]
            best[name][1] = min(best[name][1], fp_step_time(fp_unit, x, y, iters))
            best[name][2] = min(best[name][2], fp_step_time(fp_unit, x, y, iters, input_grad=True))
    return [(name, *best[name]) for name, *_ in jobs]


def profile(method: str, fp, q, calib, iters: int, bs: int, unit: str, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    jobs = list(unit_jobs(method, fp, q, calib, only=unit))
    if not jobs:
        raise SystemExit(f"no unit named {unit!r} (or below it) for {method}")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = 0.0
        for name, u, data, _ in jobs:
            torch.manual_seed(0)
            t = time.perf_counter()
            run_unit(method, name, u, data, iters, bs, fp)
            wall += time.perf_counter() - t
    print(f"\n### {method}: {', '.join(j[0] for j in jobs)}, {iters} steps, {1e3 * wall / iters:.2f} ms/step "
          "under the profiler\n")
    print("| operator | self CPU ms/step | share | calls/step |\n|---|---:|---:|---:|")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / iters:.3f} | {100 * e.self_cpu_time_total / total:.1f}% "
              f"| {e.count / iters:.1f} |")
    print(f"| all operators | {total / 1e3 / iters:.3f} | 100% | {sum(e.count for e in events) / iters:.0f} |")


def compile_check(method: str, fp, q, calib, bs: int, unit: str, reps: int = 30) -> None:
    """The step's forward + loss + backward of one unit, eager against ``torch.compile`` (the
    compile time, then CPU ms per step of each; weights and act steps train, no optimizer)."""
    name, u, data, _ = next(j for j in unit_jobs(method, fp, q, calib, only=unit) if j[0] == unit)
    hooks, opts = hooks_for(method, 1000, bs, fp)
    layers = [(f"{name}.{n}" if n else name, m) for n, m in quant_modules(u)]
    for p in hooks.setup(layers):
        p.requires_grad_(True)
    for _, m in layers:
        if m.act_quant is not None:
            m.act_quant.train()
            m.act_quant.drop_prob = opts.drop_prob
            m.act_quant.step.requires_grad_(True)
    x, y = data[0][:bs].clone(), data[2][:bs].clone()

    def step(x, y):
        return plain_loss(u(x), y)

    t = time.perf_counter()
    compiled = torch.compile(step)
    compiled(x, y).backward()
    print(f"\n{method} {unit}: torch.compile took {time.perf_counter() - t:.1f} s (first call)")
    for fn, label in ((step, "eager"), (compiled, "compiled")):
        for _ in range(WARMUP):
            fn(x, y).backward()
        t = time.process_time()
        for _ in range(reps):
            fn(x, y).backward()
        print(f"  {label}: {1e3 * (time.process_time() - t) / reps:.2f} ms per forward + backward")


def summary(rows) -> dict:
    step, base, base_in = (sum(r[k] for r in rows) for k in (1, 2, 3))
    worst = max(rows, key=lambda r: r[1] / r[2])
    return {"units": len(rows), "step_ms": 1e3 * step / len(rows), "fp_ms": 1e3 * base / len(rows),
            "fp_in_ms": 1e3 * base_in / len(rows), "ratio": step / base, "ratio_in": step / base_in,
            "worst": f"{worst[1] / worst[2]:.1f} ({worst[0]})", "rows": rows}


def compare(args, methods: list[str]) -> None:
    """Each method measured by this checkout and by ``--baseline`` in alternating subprocesses."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, __file__, "--json", "--model", args.model, "--iters", str(args.iters),
           "--batch", str(args.batch), "--threads", str(args.threads or 1), "--repeat", "1"]
    print("\n| method | units | ratio before | ratio after | after / FP f+b with input grad | step ms before "
          "| step ms after | FP f+b ms | FP f+b with input grad ms | speed-up |\n|---|---:|---:|---:|---:|---:|---:|"
          "---:|---:|---:|")
    for method in methods:
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for side, src in (("before", args.baseline), ("after", here)):
                env = {**os.environ, "PYTHONPATH": src}
                out = subprocess.run(cmd + ["--methods", method], env=env, check=True, capture_output=True, text=True)
                rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
                prev = best.get(side, {r[0]: r for r in rows})
                best[side] = {r[0]: (r[0], *(min(r[k], prev[r[0]][k]) for k in (1, 2, 3))) for r in rows}
        b, a = summary(list(best["before"].values())), summary(list(best["after"].values()))
        fp, fp_in = min(b["fp_ms"], a["fp_ms"]), min(b["fp_in_ms"], a["fp_in_ms"])
        print(f"| {method} | {a['units']} | {b['step_ms'] / fp:.2f} | {a['step_ms'] / fp:.2f} | "
              f"{a['step_ms'] / fp_in:.2f} | {b['step_ms']:.2f} | {a['step_ms']:.2f} | {fp:.2f} | {fp_in:.2f} "
              f"| {b['step_ms'] / a['step_ms']:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--profile", metavar="UNIT", default=None, help="profile this unit (e.g. layer1.0)")
    ap.add_argument("--top", type=int, default=15, help="operators shown per profile")
    ap.add_argument("--per-unit", action="store_true", help="also print every unit's ratio")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternating measurements per unit; the minimum counts (robust to other load)")
    ap.add_argument("--baseline", metavar="SRC", default=None,
                    help="the src/ folder of another checkout: measure both, alternating, in one run")
    ap.add_argument("--compile", metavar="UNIT", default=None,
                    help="time torch.compile against eager for one unit's step (forward + loss + backward)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.baseline:
        print(f"{args.model}, {args.threads or 1} thread(s), batch {args.batch}, {args.iters} steps per unit; "
              f"before = {args.baseline}, after = this checkout; minimum of {args.repeat} alternating runs")
        return compare(args, methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    fp, q, calib = setup(args.model)
    if args.json:
        for method in methods:
            print(json.dumps(summary(measure(method, fp, q, calib, args.iters, args.batch, args.repeat))))
        return
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"{args.iters} steps per unit")
    if args.profile:
        for method in methods:
            profile(method, fp, q, calib, args.iters, args.batch, args.profile, args.top)
        return
    if args.compile:
        for method in methods:
            compile_check(method, fp, q, calib, args.batch, args.compile)
        return
    print("\n| method | units | step ms (mean) | FP f+b ms (mean) | ratio | ratio to FP f+b with input grad "
          "| max unit ratio |\n|---|---:|---:|---:|---:|---:|---|")
    for method in methods:
        res = summary(measure(method, fp, q, calib, args.iters, args.batch, args.repeat))
        if args.per_unit:
            print("  " + ", ".join(f"{n} {1e3 * a:.2f}/{1e3 * b:.2f}={a / b:.2f}" for n, a, b, _ in res["rows"]))
        print(f"| {method} | {res['units']} | {res['step_ms']:.2f} | {res['fp_ms']:.2f} | {res['ratio']:.2f} "
              f"| {res['ratio_in']:.2f} | {res['worst']} |", flush=True)


if __name__ == "__main__":
    main()
