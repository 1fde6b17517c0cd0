"""Merge, then quantize (E-PMQ setting): RTN, GPTQ and E-PMQ after Task Arithmetic and TIES, over seeds.

    python benchmarks/pmq.py --seeds 0 1 2 --out docs/results/pmq_digits
    python benchmarks/pmq.py --config benchmarks/configs/vit_digits.yaml --seeds 0 1 2 --out docs/results/pmq_vit

Runs ``mergeq pmq`` (``mergeq.experiments.run_pmq``) once per seed into ``<out>/seed<k>`` (rows
already there are reused: ``run_pmq`` resumes) and writes
``<out>/pmq.md``: merged hmean, mean ± std over the seeds, per merge and bit width, with the
full-precision merged model first and the best quantized method in bold.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mergeq.experiments import Config, load_config, run_pmq
from mergeq.io import atomic_write_text


def pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def table(runs: dict[int, dict], command: str) -> str:
    rows = [r for res in runs.values() for r in res["rows"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["merge"], r["w_bits"], r["a_bits"]) for r in rows))
    first = next(iter(runs.values()))
    lines = [f"Merged hmean in %, mean ± std over seeds {sorted(runs)} ({first['benchmark']}, targets "
             f"{', '.join(first['targets'])}, preset `{first['preset']}`); best quantized method in bold.", "",
             f"    {command}", "",
             "| merge | bits | FP merged | " + " | ".join(methods) + " |", "|---|---|---:|" + "---:|" * len(methods)]
    for merge, w, a in keys:
        sel = [r for r in rows if (r["merge"], r["w_bits"], r["a_bits"]) == (merge, w, a)]
        fp = pm([r["fp_merged"]["hmean"] for r in sel if r["method"] == methods[0]])
        vals = {m: [r["merged"]["hmean"] for r in sel if r["method"] == m] for m in methods}
        best = max((m for m in methods if vals[m]), key=lambda m: statistics.mean(vals[m]))
        cols = [(f"**{pm(vals[m])}**" if m == best else pm(vals[m])) if vals[m] else "" for m in methods]
        lines.append(f"| {merge} | W{w}A{a if a is not None else 32} | {fp} | " + " | ".join(cols) + " |")
    experts = [res["fp_experts"] for res in runs.values() if "fp_experts" in res]
    if experts:
        accs = ", ".join(f"{d} {pm([e[d] for e in experts])}" for d in first["targets"])
        lines += ["", f"Full-precision experts on their own domains: {accs}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="config YAML (model, adapt, ptq options); default: the digits default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--merges", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "epmq"])
    ap.add_argument("--bits", nargs="+", default=["W4", "W3"])
    ap.add_argument("--anchor", type=float, default=1.0)
    ap.add_argument("--calib-size", type=int, default=None, help="calibration images in all (default: the config's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base = load_config(args.config) if args.config else Config()
    runs = {}
    for seed in args.seeds:
        cfg = base.updated({"runtime.seed": seed, "pmq.merges": args.merges, "pmq.methods": args.methods,
                            "pmq.bits": args.bits, "ptq.options.epmq.anchor": args.anchor,
                            **({"ptq.calib_size": args.calib_size} if args.calib_size is not None else {})})
        runs[seed] = run_pmq(cfg, Path(args.out) / f"seed{seed}", progress=True)
    command = "python benchmarks/pmq.py " + " ".join(
        ([f"--config {args.config}"] if args.config else []) + [f"--seeds {' '.join(map(str, args.seeds))}"]
        + ([f"--bits {' '.join(args.bits)}"] if args.bits != ["W4", "W3"] else [])
        + ([f"--anchor {args.anchor}"] if args.anchor != 1.0 else [])
        + ([f"--calib-size {args.calib_size}"] if args.calib_size is not None else []) + [f"--out {args.out}"])
    text = table(runs, command)
    atomic_write_text(Path(args.out) / "pmq.md", text)
    print(text)


if __name__ == "__main__":
    main()
