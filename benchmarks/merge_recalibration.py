"""Merge-time recalibration on the targets' unlabeled calibration data, and how much of the
benchmark's seed-to-seed noise it removes (issue 21, item 2).

    PYTHONPATH=src python benchmarks/merge_recalibration.py --methods qdrop hdrq rtn adaround brecq \
        --bits W3A3 W4A4 --seeds 0 1 2 3 4 5 6 7 8 9 --workers 2 --out runs/recalibration
    PYTHONPATH=src python benchmarks/merge_recalibration.py --methods hdrq hdrq:dist_lambda=0.2 \
        hdrq:dist_lambda=0.5 hdrq:dist_lambda=1.0 --seeds 0 1 2 3 4 5 6 7 --out runs/recalibration --name lambda

Per seed and method, the experts are quantized once (default preset, one torch thread, stored
under ``OUT/qexperts/`` as safetensors so that every merge variant reuses them; rerun the
command to resume) and merged with every ``merge.recalibrate`` mode (:mod:`mergeq.merge.recalibrate`):
``none`` (the plain average, the papers' data-free merge), ``act`` (activation steps re-estimated on the pooled calibration
images), ``bn`` (each layer's per-channel output statistics corrected to the mixture of the
experts' own statistics, REPAIR-style) and ``bn+act``. The full-precision merge is reported
beside them (``bn`` applies to it too). Methods may be variants, ``hdrq:dist_lambda=0.5`` (PTQ
options after the colon). ``OUT/NAME.md`` (``--name``, default ``merge_recalibration``): per bit
pair and mode, each method's mean merged hmean with its 95% Student's t interval and the prediction
interval of one new seed, its experts' accuracy and share of changed codes, and ``--anchor``
(default hdrq) minus every other method, paired per seed (Student's t interval and p, the SD of the
difference: the number issue 21 asks to bring to at most 1.5 points); ``OUT/NAME.json``: every
number per seed.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

MODES = ("none", "act", "bn", "bn+act")


def config(seed: int, method: str, bits: str, cache: str, preset: str):
    from mergeq.experiments import Config
    return Config().updated({"preset": preset, "runtime.seed": seed, "runtime.threads": 1,
                             "runtime.cache_dir": cache, "ptq.methods": [method], "ptq.bits": [bits]})


def parse_method(spec: str) -> tuple[str, dict]:
    """``hdrq`` or a variant ``hdrq:dist_lambda=0.5`` (PTQ options after the colon, comma-separated,
    read as YAML: ``lr=1e-4`` is a float)."""
    from mergeq.io import load_yaml
    base, _, opts = spec.partition(":")
    pairs = (kv.split("=", 1) for kv in opts.split(",") if kv)
    return base, {k: load_yaml(v) for k, v in pairs}


def quantized(pool, spec: str, bits: str, folder: Path) -> dict:
    """The pool's experts quantized with method variant ``spec`` (stored in ``folder``, reused when there)."""
    from mergeq.checkpoint import model_from_checkpoint, save_model
    from mergeq.quant.config import parse_bits
    name = spec.replace(":", "_").replace("=", "").replace(",", "_")
    paths = {d: folder / f"seed{pool.seed}-{name}-{bits}-{d}.safetensors" for d in pool.targets}
    if all(p.exists() for p in paths.values()):
        return {d: model_from_checkpoint(p)[0] for d, p in paths.items()}
    method, overrides = parse_method(spec)
    q = pool.quantize_experts(method, pool.qconfig(parse_bits(bits)), **overrides)
    for d, m in q.items():
        save_model(m, paths[d], pool.checkpoint_meta(domain=d, role="quantized", method=spec, bits=bits))
    return q


def cell(seed: int, method: str, bits: str, cache: str, out: str, preset: str) -> dict:
    """Merged hmean (points) of ``method``'s quantized experts under every mode, and the FP merge's."""
    from mergeq.eval import evaluate
    from mergeq.experiments.pool import Pool
    from mergeq.merge import merge
    from mergeq.merge.recalibrate import recalibrate
    from mergeq.ptq.base import changed_codes
    torch.set_num_threads(1)
    pool = Pool(config(seed, parse_method(method)[0], bits, cache, preset))
    folder = Path(out) / "qexperts"
    folder.mkdir(parents=True, exist_ok=True)
    q = quantized(pool, method, bits, folder)
    experts = [q[d] for d in pool.targets]
    calib = [pool.calib(d) for d in pool.targets]
    fp = [pool.fold(pool.expert(d)) for d in pool.targets]
    res = {"seed": seed, "method": method, "bits": bits, "merged": {}, "fp": {},
           "experts": {d: evaluate(q[d], {d: pool.tests[d]})[d] for d in pool.targets},
           "changed_codes": {d: changed_codes(q[d], f) for d, f in zip(pool.targets, fp)}}
    for mode in MODES:
        m = recalibrate(merge(experts), experts, calib, mode)
        res["merged"][mode] = evaluate(m, pool.tests)
    for mode in ("none", "bn"):
        res["fp"][mode] = evaluate(recalibrate(merge(fp), fp, calib, mode), pool.tests)
    return res


def backfill_codes(seed: int, method: str, bits: str, cache: str, out: str, preset: str) -> dict:
    """The share of changed codes per domain of a stored cell written before it was recorded."""
    from mergeq.experiments.pool import Pool
    from mergeq.ptq.base import changed_codes
    pool = Pool(config(seed, parse_method(method)[0], bits, cache, preset))
    q = quantized(pool, method, bits, Path(out) / "qexperts")
    return {d: changed_codes(q[d], pool.fold(pool.expert(d))) for d in pool.targets}


def fmt(xs: list[float]) -> str:
    """Mean [t interval] | prediction interval of one new seed."""
    from mergeq.eval.intervals import mean_ci, prediction_interval
    iv, new = mean_ci(xs), prediction_interval(xs)
    if new is None:  # one seed: no interval
        return f"{iv.estimate:.1f} | –"
    return f"{iv.estimate:.1f} [{iv.low:.1f}, {iv.high:.1f}] | [{new[0]:.1f}, {new[1]:.1f}]"


def diff(a: list[float], b: list[float]) -> str:
    """Paired a − b: mean [t interval] | the same, p | SD | sign per seed."""
    from mergeq.eval.intervals import paired_diff_ci, paired_t
    iv, t = paired_diff_ci(a, b), paired_t(a, b)
    d = [x - y for x, y in zip(a, b)]
    tt = f"[{t[0]:+.1f}, {t[1]:+.1f}], p = {t[2]:.3f}" if t else ""
    wins = f"{sum(x > 0 for x in d)}/{len(d)}"
    if len(d) < 2:  # one seed: the difference, no interval
        return f"{iv.estimate:+.1f} | | – | {wins}"
    return f"{iv.estimate:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}] | {tt} | {statistics.stdev(d):.2f} | {wins}"


def expert_mean(done: dict, m: str, b: str, seeds: list[int]) -> str:
    return f"{statistics.mean(100 * x for s in seeds for x in done[(s, m, b)]['experts'].values()):.1f}"


def codes(done: dict, m: str, b: str, seeds: list[int]) -> str:
    """Mean share of weight codes off round-to-nearest (cells computed before it was recorded: –)."""
    have = [done[(s, m, b)].get("changed_codes") for s in seeds]
    return f"{statistics.mean(100 * x for c in have for x in c.values()):.1f}" if all(have) else "–"


def report(done: dict, methods: list[str], bits: list[str], seeds: list[int], modes: list[str],
           anchor: str, command: str) -> str:
    """Per bit pair and mode: each method's merged hmean with its interval, then ``anchor`` minus
    every other method and minus the best other (by mean) with paired intervals."""
    lines = [f"```bash\n{command}\n```", "",
             f"Merged hmean in %, mean [95% Student's t interval] over seeds {', '.join(map(str, seeds))}, "
             "and the 95% prediction interval of one new seed; differences are paired per seed: mean [t interval] | "
             "Student's t interval, paired t-test p | SD of the per-seed difference | seeds where it is positive.", ""]
    for b in bits:
        methods_b = [m for m in methods if all((s, m, b) in done for s in seeds)]
        for mode in modes if methods_b else []:
            h = {m: [100 * done[(s, m, b)]["merged"][mode]["hmean"] for s in seeds] for m in methods}
            fp = [100 * done[(s, methods_b[0], b)]["fp"]["bn" if mode.startswith("bn") else "none"]["hmean"] for s in seeds]
            lines += [f"**{b}, merge.recalibrate: {mode}** (full-precision merge, same recalibration: "
                      f"{fmt(fp).replace(' | ', ', new seed ')})", "",
                      "| method | merged hmean | a new seed | expert on its own domain | codes changed (%) |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {m} | {fmt(h[m])} | {expert_mean(done, m, b, seeds)} | {codes(done, m, b, seeds)} |"
                      for m in methods_b]
            others = [m for m in methods_b if m != anchor]
            if anchor in methods_b and others:
                best = max(others, key=lambda m: statistics.mean(h[m]))
                lines += ["", f"| {anchor} minus | mean [t interval] | t interval, p | SD | {anchor} ahead |",
                          "|---|---:|---:|---:|---:|"]
                lines += [f"| {m}{' (best of the others)' if m == best else ''} | {diff(h[anchor], h[m])} |" for m in others]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["qdrop", "hdrq"])
    ap.add_argument("--bits", nargs="+", default=["W3A3"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--anchor", default="hdrq", help="the method compared with every other one")
    ap.add_argument("--preset", default="default", choices=("quick", "default"))
    ap.add_argument("--cache-dir", default=".mergeq-cache")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="merge_recalibration", help="file stem of the report (.md, .json) in OUT")
    args = ap.parse_args()
    from mergeq.io import atomic_write_text, read_json, write_json
    out = Path(args.out)
    # per bit pair, the first two methods over every seed, then the others: a stopped run has complete pairs
    jobs = sorted(((s, m, b) for b in args.bits for s in args.seeds for m in args.methods),
                  key=lambda k: (args.bits.index(k[2]), args.methods.index(k[1]) > 1, k[0], args.methods.index(k[1])))
    path = lambda s, m, b: out / "cells" / f"seed{s}-{m.replace(':', '_')}-{b}.json"  # noqa: E731
    done = {k: read_json(path(*k)) for k in jobs if path(*k).exists()}
    for k, c in done.items():
        if "changed_codes" not in c:
            c["changed_codes"] = backfill_codes(*k, args.cache_dir, args.out, args.preset)
            write_json(path(*k), c)
    with ProcessPoolExecutor(args.workers) as ex:
        futs = {k: ex.submit(cell, *k, args.cache_dir, args.out, args.preset) for k in jobs if k not in done}
        for k, f in futs.items():
            done[k] = f.result()
            write_json(path(*k), done[k])
            print(f"seed {k[0]} {k[1]} {k[2]}: " + ", ".join(f"{mode} {100 * v['hmean']:.1f}"
                                                           for mode, v in done[k]["merged"].items()), flush=True)
    command = "PYTHONPATH=src python " + " ".join(map(shlex.quote, sys.argv))
    write_json(out / f"{args.name}.json", {"command": command, "cells": [done[k] for k in jobs]})
    text = report(done, args.methods, args.bits, args.seeds, args.modes, args.anchor, command)
    atomic_write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
