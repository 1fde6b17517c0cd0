"""Weight step search: MSE vs l_p (p=2.4) vs absmax clipping, RTN on the digits experts.

    python benchmarks/step_method.py --seeds 0 1 2 --bits W4A4 W3A3 W2A4 --preset default

Prints a Markdown table: each quantized expert's own-domain accuracy (mean over targets) and
the merged model's hmean, mean ± std over seeds. Writes it to --out (default
docs/results/step_method.md).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mergeq.experiments import Config, run
from mergeq.io import atomic_write_text


def fmt(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    s = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W3A3", "W2A4"])
    ap.add_argument("--methods", nargs="+", default=["mse", "lp", "absmax"])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="docs/results/step_method.md")
    args = ap.parse_args()

    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for sm in args.methods:
                cfg = Config.from_dict({"preset": args.preset, "runtime": {"seed": seed},
                                        "ptq": {"methods": ["rtn"], "bits": args.bits, "step_method": sm}})
                res = run(cfg, Path(tmp) / f"{sm}-{seed}")
                for r in res["rows"]:
                    spec = f"W{r['w_bits']}A{r['a_bits']}"
                    c = cells.setdefault((sm, spec), {"expert": [], "merged": []})
                    c["expert"].append(statistics.mean(r["experts"].values()))
                    c["merged"].append(r["merged"]["hmean"])
    lines = [
        f"RTN with each weight-step search, preset `{args.preset}`, seeds {args.seeds}; accuracy in %, "
        "mean ± std over seeds. `expert` = mean over targets of each quantized expert on its own domain.",
        "",
        "| step search | " + " | ".join(f"{b} expert | {b} merged hmean" for b in args.bits) + " |",
        "|---|" + "---:|---:|" * len(args.bits),
    ]
    for sm in args.methods:
        cols = [f"{fmt(cells[(sm, b)]['expert'])} | {fmt(cells[(sm, b)]['merged'])}" for b in args.bits]
        lines.append(f"| {sm} | " + " | ".join(cols) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
