"""TTAQ setting over seeds: error on the continual corruption stream, mean ± std.

    python benchmarks/tta.py --seeds 0 1 2 --out docs/results/tta
    python benchmarks/tta.py --seeds 0 1 2 --methods qdrop+abl,ttaq+tent,ttaq+none --bits W4A4 --out docs/results/tta_ablation

Runs ``mergeq tta`` (``mergeq.experiments.run_tta``, default config: fp, fp+tent, qdrop, qdrop+tent,
ttaq at W4A4 and W2A4, balanced and imbalanced streams, severity 5) once per seed into
``<out>/seed<k>`` (finished rows are reused: run_tta resumes), then writes ``<out>/tta.md``
(mean error over the stream, and per corruption, mean ± std over seeds) and
``<out>/stream_error.png`` (error per batch along the stream, averaged over the seeds).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mergeq.eval.plots import plot_stream_errors
from mergeq.io import atomic_write_text
from mergeq.experiments import Config, run_tta


def pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def tables(runs: dict[int, dict], command: str) -> str:
    first = next(iter(runs.values()))
    corr = first["corruptions"]
    lines = [f"Error in % on the continual stream of {len(corr)} corruptions (severity {first['severity']}, "
             f"preset `{first['preset']}`), mean ± std over seeds {sorted(runs)}; lowest mean per stream and "
             "bit width in bold.", "", f"    {command}", ""]
    for stream, imb in first["streams"].items():
        keys = list(dict.fromkeys((r["method"], r["bits"]) for r in first["rows"] if r["stream"] == stream))
        per = {k: [r for res in runs.values() for r in res["rows"] if (r["stream"], r["method"], r["bits"]) ==
                   (stream, *k)] for k in keys}
        means = {k: statistics.mean(r["mean_error"] for r in rs) for k, rs in per.items()}
        best = {b: min(v for (m, bb), v in means.items() if bb == b) for _, b in keys}
        lines += [f"### {stream} stream" + (f" ({imb})" if imb else ""), "",
                  "| method | bits | mean error | worst class | " + " | ".join(corr) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(corr)]
        for k in keys:
            rs = per[k]
            mean = pm([r["mean_error"] for r in rs])
            mean = f"**{mean}**" if means[k] == best[k[1]] else mean
            cells = " | ".join(f"{100 * statistics.mean(r['error'][c] for r in rs):.1f}" for c in corr)
            worst = pm([max(r["class_error"]) for r in rs])
            lines.append(f"| {k[0]} | {k[1]} | {mean} | {worst} | {cells} |")
        lines.append("")
    lines.append("`worst class`: the error of the class with the highest error over the whole stream (forgetting "
                 "shows here first). Per-corruption columns: mean over seeds.")
    return "\n".join(lines) + "\n"


def mean_curves(runs: dict[int, dict]) -> list[dict]:
    """One row per (stream, method, bits) with the per-batch and mean error averaged over the seeds."""
    first = next(iter(runs.values()))
    out = []
    for row in first["rows"]:
        key = (row["stream"], row["method"], row["bits"])
        same = [r for res in runs.values() for r in res["rows"] if (r["stream"], r["method"], r["bits"]) == key]
        out.append({**row, "batch_error": [statistics.mean(v) for v in zip(*(r["batch_error"] for r in same))],
                    "mean_error": statistics.mean(r["mean_error"] for r in same)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--methods", help="comma-separated MODEL[+ADAPTER] rows (default: mergeq tta's)")
    ap.add_argument("--bits", help="comma-separated bit pairs (default W4A4,W2A4)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = {k: getattr(args, k).split(",") for k in ("methods", "bits") if getattr(args, k)}
    runs = {s: run_tta(Config.from_dict({"preset": args.preset, "runtime": {"seed": s}, "tta": rows}),
                       Path(args.out) / f"seed{s}") for s in args.seeds}
    command = " ".join(["python benchmarks/tta.py", f"--seeds {' '.join(map(str, args.seeds))}",
                        *(f"--{k} {','.join(v)}" for k, v in rows.items()), f"--out {args.out}"])
    text = tables(runs, command)
    atomic_write_text(Path(args.out) / "tta.md", text)
    plot_stream_errors(mean_curves(runs), Path(args.out) / "stream_error.png",
                       title=f"error along the stream, mean over seeds {args.seeds}")
    print(text)


if __name__ == "__main__":
    main()
