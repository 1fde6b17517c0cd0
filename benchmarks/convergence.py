"""Convergence of the PTQ methods against the reconstruction budget (iterations per unit).

    python benchmarks/convergence.py --config benchmarks/studies/convergence.yaml \
        --out docs/results/convergence --workers 2

For every seed x bit pair x method x schedule variant x budget, the three SHOT experts of the
default preset are quantized (each on its own target's calibration split) with ``iters`` =
budget and merged by averaging (float rounding, Eq. 11). Recorded per job: each expert's
own-domain accuracy, the merged accuracy per domain and its hmean, the final reconstruction
error (rec_loss of each hardened unit over the calibration inputs, mean over units), the fraction of weight codes that differ from
round-to-nearest on the same grids, and seconds. Jobs are written one JSON each into
``out/jobs`` when they finish (a rerun skips them) and run in ``--workers`` processes with one
torch thread each; the models of every seed are trained (or read from the cache) first.
``out/convergence.md`` holds the tables (mean ± std over seeds), ``out/convergence.png`` the curves.

The study file (YAML) gives ``seeds``, ``bits``, ``methods``, ``iters`` (budgets), ``variants``
(name -> {method: {option: value}}; a variant applies to the methods it names, the variant
``paper`` to every method, with the overrides it names on top of the preset's options; the
option ``step_method`` picks the weight grid the method starts from) and ``config``, a mergeq
config (``preset``, ``data``, ...) for every job.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import yaml

from mergeq.experiments import Config, Pool
from mergeq.io import atomic_write_text, write_json
from mergeq.quant import parse_bits

def jobs_of(cfg: dict) -> list[tuple]:
    """(seed, bits, method, variant, iters) for every job the config asks for."""
    out = []
    for seed, bits, method, (variant, over), iters in itertools.product(
            cfg["seeds"], cfg["bits"], cfg["methods"], cfg["variants"].items(), cfg["iters"]):
        if variant == "paper" or method in over:  # paper: every method; another variant: the methods it names
            out.append((seed, bits, method, variant, iters))
    return out


def key_of(job: tuple) -> str:
    seed, bits, method, variant, iters = job
    return f"seed{seed}__{bits}__{method}__{variant}__{iters}"


def run_config(cfg: dict, seed: int) -> Config:
    return Config.from_dict(cfg.get("config") or {}).updated(
        {"runtime.seed": seed, "runtime.threads": 1, "ptq.methods": ["rtn"], "ptq.bits": ["W8A8"]})


def run_job(cfg: dict, job: tuple, out: str) -> dict:
    seed, bits, method, variant, iters = job
    pool = Pool(run_config(cfg, seed))
    options = {**cfg["variants"][variant].get(method, {}), "iters": iters}
    qcfg = pool.qconfig(parse_bits(bits))
    qcfg = dataclasses.replace(qcfg, step_method=options.pop("step_method", qcfg.step_method))  # the start grid
    t0 = time.perf_counter()
    q = pool.quantize_experts(method, qcfg, **options)
    seconds = time.perf_counter() - t0
    from mergeq.eval import accuracy

    res = {
        "key": key_of(job), "seed": seed, "bits": bits, "method": method, "variant": variant, "iters": iters,
        "options": options, "seconds": seconds,
        "experts": {d: accuracy(m, pool.tests[d], device=pool.device) for d, m in q.items()},
        "merged": pool.merge_and_evaluate(list(q.values())),
        "recon_loss": {d: statistics.mean(m.mergeq_meta["recon_loss"].values()) for d, m in q.items()},
        "changed_codes": {d: m.mergeq_meta["changed_codes"] for d, m in q.items()},
    }
    write_json(Path(out) / "jobs" / f"{res['key']}.json", res)
    return res


def _mean_sd(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.{digits}f} ± {scale * sd:.{digits}f}"


def series(results: list[dict]) -> dict[tuple, dict[int, list[dict]]]:
    """(bits, method, variant) -> iters -> results over seeds."""
    out: dict[tuple, dict[int, list[dict]]] = {}
    for r in sorted(results, key=lambda r: (r["bits"], r["method"], r["variant"], r["iters"], r["seed"])):
        out.setdefault((r["bits"], r["method"], r["variant"]), {}).setdefault(r["iters"], []).append(r)
    return out


def tables(results: list[dict]) -> str:
    lines = []
    for bits in dict.fromkeys(r["bits"] for r in results):
        lines += [f"### {bits}", "",
                  "Merged hmean %, own-domain expert accuracy % (mean over the three experts), final "
                  "reconstruction loss (mean over units and experts), weight codes changed from "
                  "round-to-nearest %; mean ± std over seeds (n = number of seeds).", "",
                  "| method | schedule | iters/unit | n | merged hmean | expert acc | recon loss | codes changed | s/expert |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (b, method, variant), by_iters in series(results).items():
            if b != bits:
                continue
            for iters, rs in by_iters.items():
                lines.append(
                    f"| {method} | {variant} | {iters} | {len(rs)} | {_mean_sd([r['merged']['hmean'] for r in rs])} "
                    f"| {_mean_sd([statistics.mean(r['experts'].values()) for r in rs])} "
                    f"| {_mean_sd([statistics.mean(r['recon_loss'].values()) for r in rs], 1.0, 4)} "
                    f"| {_mean_sd([statistics.mean(r['changed_codes'].values()) for r in rs], 100.0, 2)} "
                    f"| {statistics.mean(r['seconds'] for r in rs) / len(rs[0]['experts']):.0f} |")
        lines.append("")
    return "\n".join(lines)


def margins(results: list[dict], method: str = "hdrq", variant: str = "paper") -> str:
    """Per bits and budget: ``method`` (its ``variant``) minus the best baseline, per seed. Each
    baseline takes the schedule with the best mean over seeds at that budget (chosen on the same
    seeds: this favours the baselines), then the best of those per seed."""
    by = series(results)
    lines = ["| bits | iters/unit | baselines (schedule) | " + f"{method} − best baseline, per seed | mean |",
             "|---|---:|---|---|---:|"]
    for (bits, m, v), by_iters in by.items():
        if (m, v) != (method, variant):
            continue
        for iters, own in by_iters.items():
            chosen = {}
            for (b2, m2, v2), other in by.items():
                rs = other.get(iters, [])
                if b2 != bits or m2 == method or not rs:
                    continue
                mean = statistics.mean(r["merged"]["hmean"] for r in rs)
                if m2 not in chosen or mean > chosen[m2][0]:
                    chosen[m2] = (mean, v2, {r["seed"]: r["merged"]["hmean"] for r in rs})
            seeds = [r["seed"] for r in own if all(r["seed"] in c[2] for c in chosen.values())]
            if not chosen or not seeds:
                continue
            own_h = {r["seed"]: r["merged"]["hmean"] for r in own}
            diffs = [100 * (own_h[k] - max(c[2][k] for c in chosen.values())) for k in seeds]
            names = ", ".join(f"{m2} ({c[1]})" for m2, c in sorted(chosen.items()))
            per = ", ".join(f"seed {k}: {d:+.1f}" for k, d in zip(seeds, diffs))
            lines.append(f"| {bits} | {iters} | {names} | {per} | {statistics.mean(diffs):+.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bit_list = list(dict.fromkeys(r["bits"] for r in results))
    metrics = [("merged hmean (%)", lambda r: 100 * r["merged"]["hmean"]),
               ("expert accuracy (%)", lambda r: 100 * statistics.mean(r["experts"].values())),
               ("codes changed from RTN (%)", lambda r: 100 * statistics.mean(r["changed_codes"].values()))]
    fig, axes = plt.subplots(len(bit_list), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(bit_list)),
                             squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in results))}
    styles = {v: s for v, s in zip(dict.fromkeys(r["variant"] for r in results), ["-", "--", ":", "-."] * 4)}
    for (bits, method, variant), by_iters in series(results).items():
        row = bit_list.index(bits)
        xs = sorted(by_iters)
        for col, (label, fn) in enumerate(metrics):
            ys = [statistics.mean(fn(r) for r in by_iters[x]) for x in xs]
            sds = [statistics.stdev([fn(r) for r in by_iters[x]]) if len(by_iters[x]) > 1 else 0.0 for x in xs]
            ax = axes[row][col]
            ax.errorbar(xs, ys, yerr=sds, marker="o", ms=3, capsize=2, color=colors[method],
                        label=method if variant == "paper" else f"{method} ({variant})",
                        linestyle=styles[variant])
            ax.set(xscale="log", xlabel="iterations per unit", ylabel=label, title=f"{bits}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML with seeds, bits, methods, iters, variants")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", default=None, help="run only jobs whose key contains this text")
    ap.add_argument("--report", action="store_true", help="run nothing: rebuild the tables and PNG from out/jobs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    if not args.report:
        atomic_write_text(out / "config.yaml", Path(args.config).read_text())
    jobs = [j for j in jobs_of(cfg) if not args.report and (args.only is None or args.only in key_of(j))]
    todo = sorted((j for j in jobs if not (out / "jobs" / f"{key_of(j)}.json").exists()),
                  key=lambda j: (j[4], j[0], j[1], j[2], j[3]))  # small budgets first: every curve grows
    for seed in sorted({j[0] for j in todo}):
        Pool(run_config(cfg, seed)).experts  # train (or read) the source model and experts once
    print(f"{len(todo)} of {len(jobs)} jobs to run", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.workers), mp_context=get_context("spawn")) as executor:
        futures = {executor.submit(run_job, cfg, j, str(out)): j for j in todo}
        for n, f in enumerate(as_completed(futures), 1):
            r = f.result()
            print(f"[{n}/{len(todo)} {time.perf_counter() - t0:.0f} s] {r['key']}: merged {100 * r['merged']['hmean']:.1f}",
                  flush=True)
    results = [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))]
    if not results:
        raise SystemExit(f"no finished jobs in {out / 'jobs'}")
    margin = margins(results)
    margin = "\n### HDRQ minus the best baseline\n\n" + margin if margin.count("\n") > 2 else ""
    atomic_write_text(out / "convergence.md", tables(results) + margin)
    if len({r["iters"] for r in results}) > 1:  # a curve needs two budgets
        plot(results, out / "convergence.png")
    print(f"wrote {out / 'convergence.md'} (and convergence.png for two budgets or more)")


if __name__ == "__main__":
    main()
