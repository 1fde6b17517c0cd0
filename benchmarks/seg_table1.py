"""The HDRQ paper's Table 1 comparison on the embedded segmentation benchmark (issue 29 item 8):
every PTQ method at W6A6 and W4A4 over paired seeds, merged mIoU-H with 95% Student's t
intervals, recalibrated (``merge.recalibrate: bn+act``) and data-free (the paper's merge), and
HDRQ minus QDrop set against the paper's +1.19 (W6A6) and +4.21 (W4A4).

    PYTHONPATH=src python benchmarks/seg_table1.py --preset default --seeds 5 --workers 2 --out runs/seg_table1

The grid runs with ``mergeq compare`` (resumable: rerun the command to finish it; the cells, each a
``run`` row with ``merge.data_free_row``, lie in ``OUT/grid``), which also writes the recalibrated
comparison (``OUT/results.md``, ``compare.png``); this script then summarises the data-free merges
of the same cells the same way and writes ``OUT/table1.md`` and ``OUT/table1.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {"W6A6": 1.19, "W4A4": 4.21}  # HDRQ minus QDrop, mIoU points (paper Table 1, H over C and I)


def _rows(res: dict, bits: list[str], methods: list[str]) -> list[str]:
    from mergeq.experiments.compare import _ci_text, _diff_text

    lines = ["| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    lines += [f"| {m} | " + " | ".join(_ci_text(res["bits"][b]["methods"][m]) for b in bits) + " |" for m in methods]
    pairs = [(p["a"], p["b"]) for p in res["bits"][bits[0]]["pairs"]]
    lines += [f"| {a} − {z} | " + " | ".join(_diff_text(res["bits"][b]["pairs"][i]) for b in bits) + " |"
              for i, (a, z) in enumerate(pairs) if a == "hdrq" or z == "hdrq"]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=["quick", "default"])
    ap.add_argument("--methods", nargs="+", default=["hdrq", "qdrop", "brecq", "adaround", "rtn"])
    ap.add_argument("--bits", nargs="+", default=["W6A6", "W4A4"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/seg_table1")
    ap.add_argument("--cache-dir", default=".mergeq-cache")
    args = ap.parse_args(argv)

    from mergeq.experiments import Config
    from mergeq.experiments.compare import compare, summarize
    from mergeq.io import atomic_write_text, write_json

    cfg = Config.from_dict({
        "preset": args.preset, "data": {"kind": "streets"},
        "ptq": {"methods": args.methods, "bits": args.bits},
        "merge": {"recalibrate": "bn+act", "data_free_row": True},
        "grid": {"seeds": list(range(args.seeds))},
        "runtime": {"threads": 1, "cache_dir": args.cache_dir}})
    out = Path(args.out)
    recal = compare(cfg, out, workers=args.workers, progress=lambda d, n, t: print(f"[{d}/{n}] {t}", flush=True))
    cells = [json.loads(p.read_text()) for p in sorted((out / "grid" / "cells").glob("*.json"))]
    free = summarize([{**c, "merged": c["merged_data_free"],
                       "fp_merged": c["fp_merged"]} for c in cells if "merged_data_free" in c], args.methods, args.bits)
    lines = [f"# Table 1 in miniature: streets (synthetic -> city + india), preset {args.preset}, "
             f"{len(recal['units'])} paired seeds", "",
             "Merged mIoU-H in % [95% Student's t interval over seeds]; paired differences in points with "
             "their t interval and p. Paper (GTA5 -> Cityscapes + IDD, ResNet-101): HDRQ − QDrop "
             + ", ".join(f"{b} {v:+.2f}" for b, v in PAPER.items()) + " (one run, no interval).", "",
             "## Recalibrated merge (`merge.recalibrate: bn+act`)", "", *_rows(recal, args.bits, args.methods), "",
             "## Data-free merge (the paper's)", "", *_rows(free, args.bits, args.methods), ""]
    atomic_write_text(out / "table1.md", "\n".join(lines))
    write_json(out / "table1.json", {"recalibrated": recal, "data_free": free, "paper_hdrq_minus_qdrop": PAPER})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
