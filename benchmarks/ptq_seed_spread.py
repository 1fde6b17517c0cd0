"""Merged hmean of the same experts quantized with several PTQ seeds (the reconstruction's own
randomness: mini-batches, QDrop masks, HDRQ noise), for comparing two versions of the code.

    PYTHONPATH=src python benchmarks/ptq_seed_spread.py --ptq-seeds 0 1 2 --out spread.json

The experts are those of ``mergeq run`` (default preset, data seed ``--seed``, ``--threads``
torch threads, models from ``--cache-dir``); only the seed passed to ``quantize`` varies. Run
it from two checkouts on the same cache to see whether a change moves results by more than
the spread that the random stream alone causes.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mergeq.experiments import Config, Pool
from mergeq.ptq import ptq_options, quantize
from mergeq.quant import QuantConfig, parse_bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["qdrop", "hdrq"])
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    ap.add_argument("--ptq-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=".mergeq-cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    exp = Pool(Config.from_dict({"preset": args.preset, "runtime": {"seed": args.seed, "threads": args.threads,
                                                                    "cache_dir": args.cache_dir}}))
    cfg, rows = exp.cfg, []
    for bits in args.bits:
        w, a = parse_bits(bits)
        for method in args.methods:
            for s in args.ptq_seeds:
                q = [quantize(m, method, calib=exp.bench.targets[d].train, config=QuantConfig(w, a), source=exp.source,
                              calib_size=cfg.ptq.calib_size, seed=s, **ptq_options(method, cfg.preset))
                     for d, m in exp.experts.items()]
                h = exp.merge_and_evaluate(q)["hmean"]
                rows.append({"bits": bits, "method": method, "ptq_seed": s, "hmean": h})
                print(f"{bits} {method} ptq seed {s}: merged hmean {100 * h:.2f}", flush=True)
            hs = [r["hmean"] for r in rows if r["bits"] == bits and r["method"] == method]
            print(f"{bits} {method}: {100 * statistics.mean(hs):.2f} ± {100 * statistics.stdev(hs):.2f} "
                  f"(min {100 * min(hs):.2f}, max {100 * max(hs):.2f})", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
