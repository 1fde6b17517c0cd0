"""Where the spread between seeds comes from: one source of randomness at a time (issue 21, item 1).

    PYTHONPATH=src python benchmarks/variance_sources.py --methods qdrop hdrq --bits W3A3 --values 5 \
        --out runs/variance

Around the config's base (``runtime.seed``, one torch thread), each factor takes ``--values``
values while every other source stays at the base:

=========  ==================================  =====================================================
factor     config entry                        what varies
=========  ==================================  =====================================================
all        ``runtime.seed``                    everything at once (the usual "new seed")
split      ``runtime.seeds.split``             the data split (and the digits targets' noise and
                                               patches); every model is retrained on it
source     ``runtime.seeds.source``            the source model's init, batches, augmentation
shot       ``runtime.seeds.shot``              the SHOT adaptation of the experts
ptq        ``runtime.seeds.ptq``               PTQ: reconstruction batches, QDrop masks, HDRQ noise
calib      ``runtime.seeds.calib``             the calibration subset (a seeded draw for each value)
merge      ``merge.rounding_options.seed``     the merge draw (sampling roundings; skipped for float)
threads    ``runtime.threads`` 1, 2, ...       float numerics (a proxy for another CPU kind);
                                               every model is retrained with that many threads
                                               (up to the CPUs there are)
=========  ==================================  =====================================================

Seed values are ``base .. base + values - 1``. Each (factor, value) is the two methods at the bit
pair as a ``mergeq bench`` grid in ``OUT/<factor>-<value>`` (resumable: rerun the command; a value
equal to the base is the shared ``OUT/base``). ``OUT/variance_sources.md`` holds, per factor, the
standard deviation over its values of each method's merged hmean and of the paired difference
a − b (points), with the command; ``OUT/variance_sources.json`` the numbers per value.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

from mergeq.experiments import Config, Pool, load_config, run_grid
from mergeq.experiments.config import parse_set
from mergeq.io import atomic_write_text, write_json

FACTORS = {"all": "runtime.seed", "split": "runtime.seeds.split", "source": "runtime.seeds.source",
           "shot": "runtime.seeds.shot", "ptq": "runtime.seeds.ptq", "calib": "runtime.seeds.calib",
           "merge": "merge.rounding_options.seed", "threads": "runtime.threads"}
WHAT = {"all": "everything (runtime.seed)", "split": "data split", "source": "source training", "shot": "SHOT",
        "ptq": "PTQ randomness", "calib": "calibration subset", "merge": "merge rounding draw",
        "threads": "float numerics (torch threads)"}


def base_config(args: argparse.Namespace) -> Config:
    """The config of the base point: ``--config``, ``--set``, then the script's flags."""
    cfg = load_config(args.config) if args.config else Config()
    changes = dict(parse_set(s) for s in args.set)
    changes.update({"ptq.methods": args.methods, "ptq.bits": [args.bits], "grid.seeds": None,
                    "grid.ptq_seeds": None, **({"preset": args.preset} if args.preset else {})})
    return cfg.updated(changes)


def points(cfg: Config, values: int) -> dict[str, list[tuple[object, dict]]]:
    """Per factor, its values and the config changes of each (``{}``: the base point itself)."""
    seed = cfg.runtime.seed
    merge_base = cfg.merge.rounding_options.get("seed", seed)
    out = {}
    for factor, path in FACTORS.items():
        if factor == "merge" and not cfg.merge.rounding.startswith("noise"):
            continue  # a deterministic rounding draws nothing
        base = {"merge": merge_base, "threads": cfg.runtime.threads or 1}.get(factor, seed)
        # more torch threads than CPUs is refused (mergeq.bounds): the threads factor stops at the CPUs
        vals = range(1, min(values, os.cpu_count() or 1) + 1) if factor == "threads" else range(base, base + values)
        # a calib seed draws a subset, while the base calibrates on the split's first images
        out[factor] = [(v, {} if v == base and factor != "calib" else {path: v}) for v in vals]
    return out


def hmeans(cfg: Config, name: str, changes: dict, out: Path, workers: int | None) -> dict[str, float]:
    """Merged hmean (points) of each method at the base point moved by ``changes`` (a bench grid in
    ``out/name``; the base point itself in ``out/base``)."""
    cells = run_grid(cfg.updated(changes), out / (name if changes else "base"), workers=workers)
    return {c["method"]: 100 * c["merged"]["hmean"] for c in cells}


def test_sd(merged: dict[str, float], sizes: dict[str, int]) -> float:
    """SD (points) of a merged hmean from the finite test sample alone: each target's accuracy
    binomial over its test images, carried through the harmonic mean by the delta method
    (dH/da_i = H² / (k a_i²)); computed at the base point, not a run."""
    acc = {d: max(merged[d], 1e-9) for d in sizes}
    k = len(acc)
    h = k / sum(1 / a for a in acc.values())
    return 100 * math.sqrt(sum((h * h / (k * a * a)) ** 2 * a * (1 - a) / sizes[d] for d, a in acc.items()))


def table(res: dict, a: str, b: str, command: str, test: dict[str, float]) -> str:
    """The Markdown report: one row per factor, the std over its values; the test sample's share
    (``test``: each method's SD from :func:`test_sd`); the root of the summed single-factor
    variances beside the measured "all"."""
    def sd(xs: list[float]) -> str:
        return f"{statistics.stdev(xs):.2f}" if len(xs) > 1 else "–"

    def var(factor: str, f) -> float:
        xs = [f(r) for r in res[factor]]
        return statistics.variance(xs) if len(xs) > 1 else 0.0

    lines = [f"```bash\n{command}\n```", "",
             f"Standard deviation (points of merged hmean) over each factor's values, the other sources at the "
             f"base; {a} − {b} is the paired difference on the same point.", "",
             f"| factor | varies | values | sd {a} | sd {b} | sd {a} − {b} | mean {a} − {b} |",
             "|---|---|---|---:|---:|---:|---:|"]
    for factor, rows in res.items():
        d = [r[a] - r[b] for r in rows]
        lines.append(f"| {factor} | {WHAT[factor]} | {', '.join(str(r['value']) for r in rows)} | "
                     f"{sd([r[a] for r in rows])} | {sd([r[b] for r in rows])} | {sd(d)} | "
                     f"{statistics.mean(d):+.2f} |")
    lines.append(f"| test | the test sample (binomial, computed at the base point; not a run) | – | {test[a]:.2f} | "
                 f"{test[b]:.2f} | – | – |")
    single = [f for f in res if f != "all"]
    if single:
        parts = [(lambda r: r[a]), (lambda r: r[b]), (lambda r: r[a] - r[b])]
        roots = [math.sqrt(sum(var(f, g) for f in single)) for g in parts]
        lines.append(f"| sum | √(sum of the single-factor variances above, {', '.join(single)}) | – | "
                     + " | ".join(f"{x:.2f}" for x in roots) + " | – |")
    lines += ["", "With few values a standard deviation is itself noisy (2 values: one difference / √2; 3 values: "
              "its 95% interval runs from about 0.5x to 6x the estimate).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="mergeq config (data, model, preset, ...); default: mergeq's defaults")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="any config entry (repeatable)")
    ap.add_argument("--preset", choices=("quick", "default", "paper"))
    ap.add_argument("--methods", nargs=2, default=["qdrop", "hdrq"], metavar=("A", "B"))
    ap.add_argument("--bits", default="W3A3")
    ap.add_argument("--values", type=int, default=5, help="values per factor (at least 2)")
    ap.add_argument("--factors", nargs="+", choices=list(FACTORS), default=list(FACTORS))
    ap.add_argument("--workers", type=int, default=None, help="cells side by side (runtime.workers)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.values < 2:
        ap.error(f"--values: a spread needs at least 2 values, got {args.values}")
    cfg, out = base_config(args), Path(args.out)
    res = {}
    for factor, vals in points(cfg, args.values).items():
        if factor in args.factors:
            res[factor] = [{"value": v, "changes": ch, **hmeans(cfg, f"{factor}-{v}", ch, out, args.workers)}
                           for v, ch in vals]
            print(f"{factor}: " + "; ".join(f"{r['value']}: " + ", ".join(f"{m} {r[m]:.1f}" for m in args.methods)
                                            for r in res[factor]), flush=True)
    base = {c["method"]: c["merged"] for c in run_grid(cfg, out / "base", workers=args.workers)}
    sizes = {d: len(ds) for d, ds in Pool(cfg).tests.items()}
    test = {m: test_sd(base[m], sizes) for m in args.methods}
    command = "PYTHONPATH=src python " + " ".join(map(shlex.quote, sys.argv))
    write_json(out / "variance_sources.json", {"command": command, "methods": args.methods, "bits": args.bits,
                                                "factors": res, "test_sizes": sizes, "test_sd": test})
    atomic_write_text(out / "variance_sources.md", table(res, *args.methods, command, test))
    print((out / "variance_sources.md").read_text())


if __name__ == "__main__":
    main()
