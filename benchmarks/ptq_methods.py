"""PTQ methods on the digits experts: own-domain accuracy, merged hmean, seconds per expert.

    python benchmarks/ptq_methods.py --preset default --seeds 0 1 2 --bits W4A4 W3A3

Each variant quantizes the three SHOT experts (each on its own target's calibration split),
merges them by averaging (float rounding, Eq. 11) and evaluates. Variants beyond the methods'
defaults: HDRQ with U[-Δ/2, Δ/2] noise instead of the empirical residual histogram, with the
squared distance, and the paper's Table 3 ablation (QDrop, + noise, + distance).
Writes docs/results/ptq_methods.md and a JSON file with every number.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mergeq.experiments import Config, Pool
from mergeq.experiments.run import row
from mergeq.io import atomic_write_text, write_json
from mergeq.quant import parse_bits

VARIANTS = {
    "rtn": ("rtn", {}),
    "adaround": ("adaround", {}),
    "brecq": ("brecq", {}),
    "qdrop": ("qdrop", {}),
    "hdrq": ("hdrq", {}),
    "hdrq, uniform noise": ("hdrq", {"noise": "uniform"}),
    "hdrq, squared distance": ("hdrq", {"dist_squared": True}),
    "hdrq, no distance (QDrop + noise)": ("hdrq", {"distance": False}),
    "hdrq, no noise, no distance": ("hdrq", {"noise": False, "distance": False}),
}


def pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def adaptation_table(fps: dict[int, dict], preset: str) -> str:
    """Source accuracy per domain before adaptation, each SHOT expert's after, FP merges."""
    first = next(iter(fps.values()))
    targets = list(first["fp"]["experts"])
    src = next(k for k in first["source"] if k not in targets and k != "hmean")
    lines = [f"Preset `{preset}`; accuracy in %. Source model before adaptation on every domain; each SHOT "
             "expert on its own target; full-precision merges of the three experts (hmean over targets).", "",
             f"| seed | source on {src} | " + " | ".join(f"source on {d} | expert on {d}" for d in targets)
             + " | merged (BN folded) | merged (BN mixture) |", "|---|---:|" + "---:|---:|" * len(targets) + "---:|---:|"]
    for seed, fp in fps.items():
        cols = [f"{100 * fp['source'][d]:.1f} | {100 * fp['fp']['experts'][d]:.1f}" for d in targets]
        lines.append(f"| {seed} | {100 * fp['source'][src]:.1f} | " + " | ".join(cols)
                     + f" | {100 * fp['fp']['merged']['hmean']:.1f} | {100 * fp['fp_bn_mixture']['hmean']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    ap.add_argument("--out", default="docs/results/ptq_methods.md")
    args = ap.parse_args()

    rows: list[dict] = []
    fps: dict[int, dict] = {}
    for seed in args.seeds:
        exp = Pool(Config.from_dict({"preset": args.preset, "runtime": {"seed": seed}, "ptq": {"methods": ["rtn"]}}))
        fp = fps[seed] = exp.fp_results()
        for spec in args.bits:
            for name in args.variants:
                method, overrides = VARIANTS[name]
                r = row(exp, method, parse_bits(spec), **overrides)
                rows.append({**r, "variant": name, "bits": spec, "seed": seed, "fp_merged": fp["fp"]["merged"]["hmean"]})
                print(f"seed {seed} {spec} {name}: experts {r['experts']} merged {r['merged']['hmean']:.3f}", flush=True)
    write_json(Path(args.out).with_suffix(".json"), {"rows": rows, "fp": fps})
    atomic_write_text(Path(args.out).with_suffix(".adaptation.md"), adaptation_table(fps, args.preset))

    lines = [
        f"Preset `{args.preset}`, seeds {args.seeds}; accuracy in %, mean ± std over seeds. `expert` = each "
        "quantized expert on its own domain, averaged over the targets; `merged` = hmean of the averaged "
        "model over the targets; seconds = wall time per expert on 2 CPU cores.",
        "",
        "| variant | " + " | ".join(f"{b} expert | {b} merged | {b} s/expert" for b in args.bits) + " |",
        "|---|" + "---:|---:|---:|" * len(args.bits),
    ]
    for name in args.variants:
        cols = []
        for spec in args.bits:
            sel = [r for r in rows if r["variant"] == name and r["bits"] == spec]
            cols.append(f"{pm([statistics.mean(r['experts'].values()) for r in sel])} | "
                        f"{pm([r['merged']['hmean'] for r in sel])} | "
                        f"{statistics.mean(r['seconds_per_expert'] for r in sel):.1f}")
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    fp_h = [r["fp_merged"] for r in rows if r["variant"] == args.variants[0] and r["bits"] == args.bits[0]]
    lines += ["", f"Full-precision merged hmean (BN folded, averaged): {pm(fp_h)}.", ""]
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
