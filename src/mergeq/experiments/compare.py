"""``mergeq compare``: PTQ methods against each other over seeds, with 95% intervals (issue 21).

A thin layer over :func:`mergeq.experiments.bench.run_grid`: the grid ``ptq.methods`` x
``ptq.bits`` x ``grid.seeds`` (each seed its own source model and experts) or, cheaper, x
``grid.ptq_seeds`` (the experts of ``runtime.seed``, only the PTQ seed and the calibration subset
vary) runs into ``OUT/grid`` on bench's executors, resumably. Then, per bit pair, each method's
merged hmean (mean over seeds with its 95% Student's t interval, clipped to [0, 100]) and, for
each pair of methods in the order given, the paired difference (same seed;
:func:`mergeq.eval.intervals.paired_diff_ci`, clipped to [-100, 100]) with its interval, the
paired t-test's p and the sentence :func:`~mergeq.eval.intervals.verdict` writes from it (no
verdict below :data:`~mergeq.eval.intervals.MIN_VERDICT_SEEDS` paired seeds). The intervals and
why t: :mod:`mergeq.eval.intervals`.

The unit of every interval is the seed, or, with PTQ seeds on one seed, the PTQ seed. With both
(``--seeds 2 --ptq-seeds 2``) the PTQ seeds of a seed share its source model and experts, so
they are not independent: each seed's value is the mean over its PTQ seeds and the intervals are
over the seeds (``ptq_seeds_averaged`` lists them).

``compare`` holds ``OUT/.locks/out.lock`` while it runs and refuses a folder of another command
(:func:`mergeq.experiments.store.claimed`); the cells are checked as ``bench`` checks them.

OUT gets ``config.yaml`` (the resolved request: rerun it to reproduce), ``results.json``,
``results.md`` and ``compare.png``. results.json: {"experiment": "compare", "benchmark",
"targets", "confidence", "interval": "student-t", "unit": "seed" | "PTQ seed", "units": [[seed,
ptq_seed (null where averaged or absent)], ...], "ptq_seeds_averaged": [...] | null, "fp_merged":
interval, "bits": {bits: {"methods": {method: interval + "values"}, "pairs": [{"a", "b",
**interval, "p" (null below 2 seeds or for equal differences), "sentence"}]}}, "sentences"}; an
interval is {"n", "mean", "low", "high", "predict": {"low", "high"}} in points (low/high and
predict null below 2 seeds): ``low``/``high`` bound the mean, ``predict`` one new seed's value
(:func:`mergeq.eval.intervals.prediction_interval`, clipped likewise), the range a rerun on
another seed or machine should land in.
"""
from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, MergeqError
from ..eval.intervals import (CONFIDENCE, MIN_VERDICT_SEEDS, Bounds, Interval, mean_ci, paired_diff_ci, paired_t,
                              prediction_interval, signed, verdict)
from ..io import atomic_write_text, check_out_dir, write_json
from .bench import cell_path, cells_of, run_grid, with_axes
from .config import Config, resolve
from .store import claimed

PNG = "compare.png"
ACCURACY, DIFFERENCE = (0.0, 100.0), (-100.0, 100.0)  # the range of a merged hmean and of a paired difference


def _interval(ci: Interval, values: list[float], bounds: Bounds) -> dict[str, Any]:
    """The interval of the mean and, as ``predict``, where one new seed's value would fall."""
    new = prediction_interval(values, bounds=bounds)
    return {"n": ci.n, "mean": ci.estimate, "low": ci.low, "high": ci.high,
            "predict": None if new is None else {"low": new[0], "high": new[1]}}


def _run(cell: dict) -> tuple[int, int | None]:
    return cell["seed"], cell.get("ptq_seed")


def summarize(cells: list[dict], methods: list[str], bits: list[str]) -> dict[str, Any]:
    """Per bit pair: each method's merged hmean interval and the paired differences of every pair
    (a before b in ``methods``), in points, over the units both methods have (a seed's PTQ seeds
    averaged where there are several seeds: see the module docstring)."""
    ptq_seeds = sorted({c["ptq_seed"] for c in cells if c.get("ptq_seed") is not None})
    nested = bool(ptq_seeds) and len({c["seed"] for c in cells}) > 1
    unit = (lambda run: (run[0], None)) if nested else (lambda run: run)

    def means(values: dict[tuple, float], key: Callable[[tuple], tuple]) -> dict[tuple, float]:
        groups = defaultdict(list)
        for k, v in values.items():
            groups[key(k)].append(v)
        return {k: statistics.fmean(v) for k, v in groups.items()}

    hmean = means({(c["method"], c["bits"], _run(c)): 100 * c["merged"]["hmean"] for c in cells},
                  lambda k: (k[0], k[1], unit(k[2])))
    fp = means({_run(c): 100 * c["fp_merged"]["hmean"] for c in cells}, unit)
    units = sorted(fp, key=lambda u: (u[0], -1 if u[1] is None else u[1]))
    fps = [fp[u] for u in units]
    out: dict[str, Any] = {"unit": "seed" if nested or not ptq_seeds else "PTQ seed",
                           "units": [list(u) for u in units], "ptq_seeds_averaged": ptq_seeds if nested else None,
                           "fp_merged": _interval(mean_ci(fps, bounds=ACCURACY), fps, ACCURACY),
                           "bits": {}, "sentences": []}
    for b in bits:
        values = {m: {u: hmean[(m, b, u)] for u in units if (m, b, u) in hmean} for m in methods}
        per_method = {m: {**_interval(mean_ci(list(v.values()), bounds=ACCURACY), list(v.values()), ACCURACY),
                          "values": [[*u, x] for u, x in v.items()]}
                      for m, v in values.items()}
        pairs = []
        for a, z in itertools.combinations(methods, 2):
            shared = [u for u in units if u in values[a] and u in values[z]]
            xa, xz = [values[a][u] for u in shared], [values[z][u] for u in shared]
            ci, t = paired_diff_ci(xa, xz, bounds=DIFFERENCE), paired_t(xa, xz)
            pairs.append({"a": a, "b": z, **_interval(ci, [x - y for x, y in zip(xa, xz)], DIFFERENCE),
                          "p": None if t is None else t[2], "sentence": verdict(a, z, b, ci)})
        out["bits"][b] = {"methods": per_method, "pairs": pairs}
        out["sentences"] += [p["sentence"] for p in pairs]
    return out


def _ci_text(iv: dict) -> str:
    if iv["low"] is None:
        return f"{iv['mean']:.1f} (n={iv['n']}, no interval)"
    return f"{iv['mean']:.1f} [{iv['low']:.1f}, {iv['high']:.1f}]"


def _diff_text(p: dict) -> str:
    text = signed(p["mean"])
    if p["low"] is None:
        return text + " (no interval)"
    return text + f" [{signed(p['low'])}, {signed(p['high'])}]" + ("" if p["p"] is None else f", p = {p['p']:.2f}")


def _predict_text(iv: dict) -> str:
    p = iv.get("predict")
    return "–" if p is None else f"[{p['low']:.1f}, {p['high']:.1f}]"


def markdown(res: dict[str, Any]) -> str:
    """results.md: the per-method table, the paired-difference table and one sentence per pair."""
    bits = list(res["bits"])
    methods = list(res["bits"][bits[0]]["methods"])
    pairs = [(p["a"], p["b"]) for p in res["bits"][bits[0]]["pairs"]]
    n, averaged = len(res["units"]), res.get("ptq_seeds_averaged")
    lines = [f"# {', '.join(methods)} on {res['benchmark']} ({', '.join(res['targets'])}): {n} {res['unit']}s"
             + (f", each the mean over {len(averaged)} PTQ seeds" if averaged else ""), ""]
    if averaged:
        lines += [f"The {len(averaged)} PTQ seeds of a seed share its source model and experts, so they are not "
                  f"independent: each seed's value is the mean over its PTQ seeds, and every interval is over the "
                  f"{n} seeds.", ""]
    elif res["unit"] == "PTQ seed":
        lines += [f"Every PTQ seed quantizes the experts of seed {res['units'][0][0]}: the intervals cover the PTQ and "
                  "calibration draws on these experts, not other source models or experts (--seeds).", ""]
    lines += [f"Merged hmean in %: mean over the {res['unit']}s [{100 * res['confidence']:.0f}% Student's t interval, "
             f"clipped to [0, 100]]. Full-precision merge of the same experts: {_ci_text(res['fp_merged'])}.", "",
             "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    lines += [f"| {m} | " + " | ".join(_ci_text(res["bits"][b]["methods"][m]) for b in bits) + " |" for m in methods]
    lines += ["", f"Paired differences in points (a minus b on the same {res['unit']}) [{100 * res['confidence']:.0f}% "
              "Student's t interval of the mean difference], paired t-test's p:", "",
              "| a − b | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    for i, (a, z) in enumerate(pairs):
        lines.append(f"| {a} − {z} | " + " | ".join(_diff_text(res["bits"][b]["pairs"][i]) for b in bits) + " |")
    lines += ["", f"Where one new {res['unit']} (or a rerun on another CPU kind) should land, {100 * res['confidence']:.0f}% "
              "prediction interval (Student's, wider than the interval of the mean; clipped to the possible range):",
              "",
              "| | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    lines += [f"| {m} | " + " | ".join(_predict_text(res["bits"][b]["methods"][m]) for b in bits) + " |" for m in methods]
    lines += [f"| {a} − {z} | " + " | ".join(_predict_text(res["bits"][b]["pairs"][i]) for b in bits) + " |"
              for i, (a, z) in enumerate(pairs)]
    if n < 2:
        lines += ["", f"One {res['unit']}: no interval can be given; run at least 2 (--seeds N or --ptq-seeds N)."]
    elif n < MIN_VERDICT_SEEDS:
        lines += ["", f"{n} {res['unit']}s: too few for a verdict; run at least {MIN_VERDICT_SEEDS} (below that no "
                  "test reaches 95% without assuming normal differences)."]
    lines += ["", *(f"- {s}" for s in res["sentences"]), "", f"![merged hmean and paired differences]({PNG})", ""]
    return "\n".join(lines)


def compare(config: Config, out: str | Path, executor: str = "local", workers: int | None = None,
            address: str | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the grid of ``config`` into ``out/grid`` and write the comparison into ``out``."""
    if config.grid.target_sets is not None and len(config.grid.target_sets) != 1:
        raise ConfigError(f"grid.target_sets: compare runs one target set (or data.targets), got "
                          f"{len(config.grid.target_sets)}")
    out = check_out_dir(out)
    with claimed(out, "compare"):
        return _compare(config, out, executor, workers, address, progress)


def _compare(config: Config, out: Path, executor: str, workers: int | None, address: str | None,
             progress: Callable[[int, int, str], None] | None) -> dict[str, Any]:
    """:func:`compare` under the lock on ``out``."""
    from ..eval.plots import plot_compare

    request = resolve(with_axes(config))
    wanted = cells_of(request)
    cells = {c["key"]: c for c in run_grid(request, out / "grid", executor, workers, address, progress)}
    cells = [cells[c.key] for c in wanted]
    for c, cell in zip(wanted, cells):
        for key in ("merged", "fp_merged"):
            if not isinstance(cell.get(key), dict) or "hmean" not in cell[key]:
                raise MergeqError(f"bench cell {cell_path(out / 'grid', c)} holds no {key}.hmean (compare reports "
                                  "the merged and the full-precision merged hmean): delete the file to recompute the "
                                  "cell")
    res = {"experiment": "compare", "benchmark": cells[0]["benchmark"], "targets": request.grid.target_sets[0],
           "confidence": CONFIDENCE, "interval": "student-t", **summarize(cells, request.ptq.methods, request.ptq.bits)}
    atomic_write_text(out / "config.yaml", request.to_yaml())
    write_json(out / "results.json", res)
    plot_compare(res, out / PNG, f"{res['benchmark']}: merged hmean over {len(res['units'])} {res['unit']}s")
    atomic_write_text(out / "results.md", markdown(res))
    return res

