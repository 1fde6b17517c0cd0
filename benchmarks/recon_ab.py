"""Reconstruction step, old code against new, in ONE process: steadier than ``recon_cost.py
--baseline`` (alternating subprocesses) on a machine other jobs share.

The old checkout's package is imported under another name beside this checkout's ``mergeq``;
for every method and unit the two run alternately (the order flips every round), ``--rounds``
times, each ``--iters`` timed steps after a warm-up, CPU time of the process
(``time.process_time``), one torch thread. The plain FP forward+backward that also computes
the unit input's gradient (``recon_cost.py``'s second reference) is measured in the same
rounds. Per method it prints Σ_units step / Σ_units FP f+b with input grad, as the median over
rounds of each round's sums and from the per-unit minima, old and new.

    mkdir -p /tmp/ab && git archive 1ee91b9 src/mergeq | tar -x -C /tmp/ab --strip-components=1
    mv /tmp/ab/mergeq /tmp/ab/mergeq_old          # the old package, renamed
    PYTHONPATH=src python benchmarks/recon_ab.py --old /tmp/ab --rounds 7
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recon_cost import fp_step_time  # noqa: E402  (the plain FP forward+backward, the same reference)

WARMUP = 4


def modules(pkg: str) -> dict:
    g = lambda m: importlib.import_module(f"{pkg}.{m}")  # noqa: E731
    return dict(resnet=g("models.resnet"), nn=g("nn"), blocks=g("nn.blocks"), ada=g("ptq.adaround"),
                hdrq=g("ptq.hdrq"), recon=g("ptq.recon"), ttaq=g("ptq.ttaq"), cfg=g("quant.config"))


def setup(M: dict):
    """recon_cost.setup with the package ``M``: the same seed, so both sides get the same model."""
    torch.manual_seed(0)
    model = M["resnet"].resnet8(10, 16).eval()
    calib = torch.randn(256, 3, 32, 32)
    fp = M["nn"].fold_bn(model, calib[:2]).requires_grad_(False)
    q = M["nn"].prepare(model, M["cfg"].QuantConfig(w_bits=4, a_bits=4), calib[:2])
    M["nn"].calibrate_activations(q, calib)
    return fp, q, calib


def hooks_for(M: dict, method: str, iters: int, bs: int, source):
    if method == "hdrq":
        o = M["hdrq"].HDRQOptions(iters=iters, batch_size=bs)
        return M["hdrq"].HDRQHooks(o, source), o
    if method == "ttaq":
        o = M["ttaq"].TTAQOptions(iters=iters, batch_size=bs)
        return M["ttaq"].TTAQHooks(o), o
    o = M["ada"].AdaRoundOptions(iters=iters, batch_size=bs, drop_prob=0.5 if method == "qdrop" else 0.0)
    return M["ada"].AdaRoundHooks(o, learn_act=method != "adaround", quant_act=method != "adaround"), o


def jobs(M: dict, method: str, fp, q, calib) -> list:
    out = []
    for name, unit in M["blocks"].partition(q, calib[:2], layerwise=method == "adaround"):
        x_q, _ = M["recon"].capture(q, name, calib, 128, "cpu", output=False)
        x_fp, y_fp = M["recon"].capture(fp, name, calib, 128, "cpu", output=True)
        out.append((name, copy.deepcopy(unit), (x_q, x_fp, y_fp), fp.get_submodule(name)))
    return out


def run_unit(M: dict, method: str, name: str, unit, data, iters: int, bs: int, source) -> None:
    hooks, opts = hooks_for(M, method, iters, bs, source)
    layers = [(f"{name}.{n}" if n else name, m) for n, m in M["nn"].quant_modules(unit)]
    M["recon"].reconstruct_unit(unit, layers, data, hooks, opts, "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="folder holding the old package renamed (see the docstring)")
    ap.add_argument("--old-name", default="mergeq_old")
    ap.add_argument("--methods", default="adaround,brecq,qdrop,hdrq,ttaq")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--per-unit", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, args.old)
    torch.set_num_threads(1)
    sides = {"old": modules(args.old_name), "new": modules("mergeq")}
    state = {s: setup(M) for s, M in sides.items()}
    print(f"resnet8, torch {torch.__version__}, 1 thread, batch {args.batch}, {args.iters} steps per unit and round, "
          f"{args.rounds} rounds\n\n| method | units | old / FP f+b with input grad (median of rounds; from minima) "
          "| new / FP f+b with input grad (median of rounds; from minima) | speed-up |\n|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        J = {s: jobs(M, method, *state[s]) for s, M in sides.items()}
        names = [j[0] for j in J["new"]]
        step = {s: {n: [] for n in names} for s in sides}
        fp = {n: [] for n in names}
        for r in range(args.rounds):
            for i, n in enumerate(names):
                for s in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    name, u, data, _ = J[s][i]
                    run_unit(sides[s], method, name, copy.deepcopy(u), data, WARMUP, args.batch, state[s][0])
                    torch.manual_seed(0)
                    t = time.process_time()
                    run_unit(sides[s], method, name, copy.deepcopy(u), data, args.iters, args.batch, state[s][0])
                    step[s][n].append((time.process_time() - t) / args.iters)
                _, _, data, fp_unit = J["new"][i]
                fp[n].append(fp_step_time(fp_unit, data[1][: 4 * args.batch].clone(), data[2][: 4 * args.batch],
                                            args.iters, input_grad=True))
        res = {}
        for s in sides:
            per_round = [sum(step[s][n][r] for n in names) / sum(fp[n][r] for n in names) for r in range(args.rounds)]
            res[s] = (statistics.median(per_round), sum(min(step[s][n]) for n in names) / sum(min(fp[n]) for n in names))
        print(f"| {method} | {len(names)} | {res['old'][0]:.2f}; {res['old'][1]:.2f} | {res['new'][0]:.2f}; "
              f"{res['new'][1]:.2f} | {res['old'][1] / res['new'][1]:.2f}x |", flush=True)
        if args.per_unit:
            print("  " + ", ".join(f"{n} {min(step['old'][n]) / min(fp[n]):.2f} -> {min(step['new'][n]) / min(fp[n]):.2f}"
                                   for n in names))


if __name__ == "__main__":
    main()
