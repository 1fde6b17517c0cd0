"""The merge-sample spread (HDRQ paper, Figure 3): how rounding at merge time moves the merged hmean.

Two-target merges of the same quantized experts under every rounding policy:
nearest (integer mid-point), float (Eq. 11), noise without the filter (each of N Eq. 12
samples), noise with the cosine filter (N samples per draw, one draw per filter seed; the
whole-model and the per-layer selection) and noise-ties (the reference code's rule, one draw per seed).

    python benchmarks/merge_samples.py --preset default --seeds 0 1 2 --methods hdrq qdrop --bits W4A8 W4A4

Writes docs/results/merge_samples.md (mean / min / max per policy) and
docs/figures/merge_samples.png.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from mergeq.experiments import Config, Pool
from mergeq.io import atomic_write_text
from mergeq.quant import parse_bits

POLICIES = ["nearest", "float", "noise (no filter)", "noise (filter, whole model)", "noise (filter, per layer)", "noise-ties"]


def spread(exp: Pool, qexperts: list, samples: int, draws: int) -> dict[str, list[float]]:
    h = lambda rounding, **kw: exp.merge_and_evaluate(qexperts, rounding, **kw)["hmean"]  # noqa: E731
    return {
        "nearest": [h("nearest")],
        "float": [h("float")],
        "noise (no filter)": [h("noise", samples=1, seed=s) for s in range(samples)],
        "noise (filter, whole model)": [h("noise", samples=samples, seed=1000 + s, select="model")
                                        for s in range(draws)],
        "noise (filter, per layer)": [h("noise", samples=samples, seed=1000 + s, select="layer") for s in range(draws)],
        "noise-ties": [h("noise-ties", seed=2000 + s) for s in range(draws)],
    }


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(cells)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, pol in enumerate(POLICIES):
            ys = [100 * v for v in cells[key][pol]]
            xs = [i + 0.08 * ((j % 7) - 3) for j in range(len(ys))]
            ax.scatter(xs, ys, s=10, alpha=0.6)
            ax.hlines(statistics.mean(ys), i - 0.3, i + 0.3, color="k", lw=1)
        ax.set_xticks(range(len(POLICIES)), [p.replace(" (", "\n(") for p in POLICIES], fontsize=7)
        ax.set_title(" ".join(key), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("merged hmean (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", default="uci,mnistm", help="the two target domains merged")
    ap.add_argument("--methods", nargs="+", default=["hdrq", "qdrop"])
    ap.add_argument("--bits", nargs="+", default=["W4A8", "W4A4"])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--draws", type=int, default=10, help="filtered / noise-ties draws (seeds) per cell")
    ap.add_argument("--out", default="docs/results/merge_samples.md")
    ap.add_argument("--figure", default="docs/figures/merge_samples.png")
    args = ap.parse_args()

    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in args.seeds:
        exp = Pool(Config.from_dict({"preset": args.preset, "runtime": {"seed": seed},
                                     "data": {"targets": args.targets.split(",")}, "ptq": {"methods": args.methods}}))
        for spec in args.bits:
            for method in args.methods:
                q = list(exp.quantize_experts(method, exp.qconfig(parse_bits(spec))).values())
                for pol, vals in spread(exp, q, args.samples, args.draws).items():
                    cells[(method, spec)][pol].extend(vals)
    lines = [
        f"Two-target merge ({args.targets}), preset `{args.preset}`, seeds {args.seeds}, {args.samples} noise "
        f"samples; filtered and noise-ties: {args.draws} draws per seed. Merged hmean in %: mean [min, max] (n).",
        "",
        "| experts | bits | " + " | ".join(POLICIES) + " |",
        "|---|---|" + "---|" * len(POLICIES),
    ]
    for (method, spec), pols in sorted(cells.items()):
        fmt = lambda v: f"{100 * statistics.mean(v):.1f} [{100 * min(v):.1f}, {100 * max(v):.1f}] ({len(v)})"  # noqa: E731
        lines.append(f"| {method} | {spec} | " + " | ".join(fmt(pols[p]) for p in POLICIES) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(args.out, table)
    plot({k: dict(v) for k, v in cells.items()}, Path(args.figure))


if __name__ == "__main__":
    main()
