"""Reconstruction budget, share of changed codes and merged hmean on the recalibrated benchmark
(issue 21, items 3 and 4): has each method plateaued, and does its merged hmean fall as more
codes leave round-to-nearest?

    PYTHONPATH=src python benchmarks/merge_recalibration.py --methods hdrq:iters=1000 brecq:iters=1000 \
        qdrop:iters=1000 --seeds 0 1 2 3 --out runs/recalibration --name iters1000
    PYTHONPATH=src python benchmarks/merge_recalibration.py --methods hdrq:iters=100 brecq:iters=100 \
        qdrop:iters=100 --seeds 0 1 2 3 --out runs/recalibration --name iters100
    PYTHONPATH=src python benchmarks/budget_share.py --methods hdrq brecq qdrop --iters 100 300 1000 \
        --seeds 0 1 2 3 --out runs/recalibration

Reads the cells ``merge_recalibration.py`` wrote in ``OUT/cells`` (``method:iters=N`` variants;
the plain method is the preset's budget, ``--base``). ``OUT/budget_share.md``: per method and
budget, the merged hmean (recalibrated and data-free) with its 95% Student's t interval, the
experts' accuracy, the share of changed codes, and the paired change from the base budget
(Student's t interval and p); then the methods compared at the same share of changed codes:
each seed's merged hmean interpolated linearly in the share between its budgets (no
extrapolation), paired per seed. ``OUT/budget_share.png``: merged hmean against the share.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np


def spec(method: str, iters: int, base: int) -> str:
    return method if iters == base else f"{method}:iters={iters}"


def load(out: Path, methods: list[str], budgets: list[int], seeds: list[int], bits: str, base: int) -> dict:
    """(method, budget, seed) -> (merged hmean recalibrated, data-free, changed share, expert acc), in %."""
    from mergeq.io import read_json
    cells = {}
    for m in methods:
        for it in budgets:
            for s in seeds:
                p = out / "cells" / f"seed{s}-{spec(m, it, base).replace(':', '_')}-{bits}.json"
                if not p.exists():
                    raise SystemExit(f"budget_share: missing cell {p} (run merge_recalibration.py with "
                                     f"--methods {spec(m, it, base)} --seeds {s} --bits {bits} first)")
                c = read_json(p)
                cells[m, it, s] = (100 * c["merged"]["bn+act"]["hmean"], 100 * c["merged"]["none"]["hmean"],
                                   100 * statistics.mean(c["changed_codes"].values()),
                                   100 * statistics.mean(c["experts"].values()))
    return cells


def at_share(points: list[tuple[float, float]], share: float) -> float | None:
    """Merged hmean at ``share`` by linear interpolation between budgets (None outside their range)."""
    xs, ys = zip(*sorted(points))
    return float(np.interp(share, xs, ys)) if xs[0] <= share <= xs[-1] else None


def report(cells: dict, methods: list[str], budgets: list[int], seeds: list[int], bits: str, base: int,
           shares: list[float], command: str) -> str:
    from mergeq.eval.intervals import mean_ci, paired_diff_ci, paired_t

    def ci(xs: list[float]) -> str:
        iv = mean_ci(xs)
        return f"{iv.estimate:.1f} [{iv.low:.1f}, {iv.high:.1f}]"

    def diff(a: list[float], b: list[float]) -> str:
        iv, t = paired_diff_ci(a, b), paired_t(a, b)
        tt = f" ([{t[0]:+.1f}, {t[1]:+.1f}], p = {t[2]:.3f})" if t else ""
        return f"{iv.estimate:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]{tt}"

    col = lambda m, it, k: [cells[m, it, s][k] for s in seeds]  # noqa: E731
    lines = [f"```bash\n{command}\n```", "",
             f"{bits}, seeds {', '.join(map(str, seeds))}; merged hmean in %, mean [95% Student's t interval]; "
             f"the change from {base} iterations is paired per seed: mean [t interval] (the same interval, p).", "",
             "| method | iters/unit | codes changed (%) | expert on its own domain | recalibrated (`bn+act`) | "
             f"change from {base} | data-free | change from {base} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        for it in budgets:
            same = it == base
            lines.append(f"| {m} | {it} | {statistics.mean(col(m, it, 2)):.1f} | {statistics.mean(col(m, it, 3)):.1f} | "
                         f"{ci(col(m, it, 0))} | {'–' if same else diff(col(m, it, 0), col(m, base, 0))} | "
                         f"{ci(col(m, it, 1))} | {'–' if same else diff(col(m, it, 1), col(m, base, 1))} |")
    lines += ["", "At the same share of changed codes (each seed's recalibrated merged hmean interpolated "
              "between its budgets; – where a method's budgets do not reach the share on every seed):", "",
              "| share of codes changed | " + " | ".join(methods) + " | "
              + " | ".join(f"{methods[0]} − {m}" for m in methods[1:]) + " |",
              "|---:|" + "---:|" * (2 * len(methods) - 1)]
    for share in shares:
        at = {m: [at_share([(cells[m, it, s][2], cells[m, it, s][0]) for it in budgets], share) for s in seeds]
              for m in methods}
        ok = {m: all(v is not None for v in at[m]) for m in methods}
        row = [ci(at[m]) if ok[m] else "–" for m in methods]
        row += [diff(at[methods[0]], at[m]) if ok[methods[0]] and ok[m] else "–" for m in methods[1:]]
        lines.append(f"| {share:g} | " + " | ".join(row) + " |")
    return "\n".join(lines + [""])


def plot(cells: dict, methods: list[str], budgets: list[int], seeds: list[int], bits: str, path: Path) -> None:
    from mergeq.eval.plots import _finish, _pyplot
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for m in methods:
        x = [statistics.mean(cells[m, it, s][2] for s in seeds) for it in budgets]
        y = [statistics.mean(cells[m, it, s][0] for s in seeds) for it in budgets]
        ax.plot(x, y, marker="o", label=m)
        for xi, yi, it in zip(x, y, budgets):
            ax.annotate(str(it), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("weight codes changed from round-to-nearest (%)")
    ax.set_ylabel("merged hmean, recalibrated (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    _finish(fig, path, f"{bits}: labels = iterations per unit; mean of {len(seeds)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["hdrq", "brecq", "qdrop"])
    ap.add_argument("--iters", type=int, nargs="+", default=[100, 300, 1000], help="budgets (iterations per unit)")
    ap.add_argument("--base", type=int, default=300, help="the preset's budget: its cells are the plain method")
    ap.add_argument("--bits", default="W3A3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--shares", type=float, nargs="+", default=[10, 14, 18], help="shares of changed codes (%%)")
    ap.add_argument("--out", required=True, help="merge_recalibration.py's OUT")
    args = ap.parse_args()
    if args.base not in args.iters:
        ap.error(f"--base {args.base} must be one of --iters {args.iters}")
    from mergeq.io import atomic_write_text
    out = Path(args.out)
    cells = load(out, args.methods, args.iters, args.seeds, args.bits, args.base)
    command = "PYTHONPATH=src python " + " ".join(map(shlex.quote, sys.argv))
    text = report(cells, args.methods, args.iters, args.seeds, args.bits, args.base, args.shares, command)
    atomic_write_text(out / "budget_share.md", text)
    plot(cells, args.methods, args.iters, args.seeds, args.bits, out / "budget_share.png")
    print(text)


if __name__ == "__main__":
    main()
