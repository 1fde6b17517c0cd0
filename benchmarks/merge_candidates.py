"""How many noise candidates per merge (HDRQ's noise-sampling rounding, Eq. 12 with the cosine filter)?

The paper reports "the mean results from 30 sampled weights"; the reference code draws 100
candidates per merge and keeps the one the cosine filter prefers. This script measures the
merged hmean against the number of candidates per merge (``samples``), with several draws
(merge seeds) per setting, on the quantized experts of ``mergeq run`` (all targets):

    OMP_NUM_THREADS=1 python benchmarks/merge_candidates.py --seeds 0 1 --bits W4A4 W3A3 \
        --samples 1 3 10 30 100 --draws 5 --out docs/results/merge_candidates.md

For each seed x bit pair the experts are quantized once (``--method``, default hdrq), then
merged ``draws`` times per candidate count with ``rounding="noise"`` (``select`` = per layer, the
default) and, for reference, once with ``nearest`` and ``float``. The table gives mean ± std over
seeds x draws and the mean spread (max - min over one seed's draws).
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from mergeq.experiments import Config, Pool
from mergeq.io import atomic_write_text
from mergeq.quant import parse_bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--method", default="hdrq")
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 3, 10, 30, 100])
    ap.add_argument("--draws", type=int, default=5, help="merges (merge seeds) per candidate count")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=".mergeq-cache")
    ap.add_argument("--out", default="docs/results/merge_candidates.md")
    args = ap.parse_args()

    hm: dict[tuple[str, str], list[float]] = defaultdict(list)  # (bits, policy) -> hmeans
    spread: dict[tuple[str, str], list[float]] = defaultdict(list)
    for seed in args.seeds:
        pool = Pool(Config.from_dict({"preset": args.preset, "ptq": {"methods": [args.method]},
                                      "runtime": {"seed": seed, "threads": args.threads, "cache_dir": args.cache_dir}}))
        for bits in args.bits:
            q = list(pool.quantize_experts(args.method, pool.qconfig(parse_bits(bits))).values())
            for policy in ("nearest", "float"):
                hm[(bits, policy)].append(pool.merge_and_evaluate(q, policy)["hmean"])
            for k in args.samples:
                runs = [pool.merge_and_evaluate(q, "noise", samples=k, seed=1000 + d)["hmean"] for d in range(args.draws)]
                hm[(bits, f"noise, {k}")].extend(runs)
                spread[(bits, f"noise, {k}")].append(max(runs) - min(runs))
                print(f"seed {seed} {bits} noise samples={k}: " + " ".join(f"{100 * h:.1f}" for h in runs), flush=True)

    def pm(xs: list[float]) -> str:
        return f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):.1f}"

    lines = [f"Merged hmean in % of the {args.method} experts (preset `{args.preset}`, seeds {args.seeds}, all "
             f"targets): mean ± std over seeds x {args.draws} draws; spread = max - min over one seed's draws "
             "(mean over seeds).", "",
             "| bits | rounding, candidates per merge | merged hmean | spread over draws |", "|---|---|---:|---:|"]
    for (bits, policy), xs in hm.items():
        sp = f"{100 * statistics.mean(spread[(bits, policy)]):.1f}" if (bits, policy) in spread else ""
        lines.append(f"| {bits} | {policy} | {pm(xs)} | {sp} |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
