"""Readable results: the Markdown table of each experiment and its pictures.

:func:`markdown` renders ``results.md`` from a results dict (``results["experiment"]``: run,
pmq, tta or bench); :func:`pictures` writes the PNGs beside it: ``hmean_vs_bits.png`` for run,
pmq and bench (merged hmean per method against bit width, the full-precision merge as a line;
pmq: one panel per merge method; bench: one per target set, mean ± std over seeds),
``merged_vs_experts.png`` for run (per bit width and target domain, the merged model's accuracy
against each expert's on its own domain) and ``stream_error.png`` for tta (error along the
stream). ``bench`` also gets ``bench.csv``.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..eval.metrics import harmonic_mean
from ..io import atomic_write_text

HMEAN_PNG = "hmean_vs_bits.png"
EXPERTS_PNG = "merged_vs_experts.png"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits'] if r['a_bits'] is not None else 32}"


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def _merged(m: dict) -> str:
    """Merged hmean in bold; ± the std over repeated sampling merges when there were several."""
    rep = m.get("repeats")
    extra = f" ± {_pct(rep['std'])} ({len(rep['seeds'])} merges)" if rep and len(rep["seeds"]) > 1 else ""
    return f"**{_pct(m['hmean'])}**{extra}"


def run_markdown(results: dict[str, Any]) -> str:
    """Per-domain accuracy of each quantized expert (own domain) and of the merged model, plus hmean."""
    targets = results["targets"]
    src = results["source"]
    mode = (results.get("config") or {}).get("merge", {}).get("recalibrate") or "none"
    recal = ("merged without data (`merge.recalibrate: none`)" if mode == "none" else
             f"merged, then re-estimated on the targets' unlabeled calibration images (`merge.recalibrate: {mode}`)")
    lines = [
        f"# {results['benchmark']}: quantize each expert, then merge (seed {results['seed']}, "
        f"preset {results.get('preset', '?')})",
        "",
        "Accuracy in %. `expert` = each quantized expert on its own domain; `merged` = the one "
        f"merged model on every domain, {recal}; hmean = harmonic mean over the targets. First and last "
        "layer at 8 bits unless the config says otherwise.",
        "",
        "| model | bits | " + " | ".join(f"{d} expert" for d in targets) + " | "
        + " | ".join(f"{d} merged" for d in targets) + " | merged hmean | s/expert |",
        "|---|---|" + "---:|" * (2 * len(targets) + 2),
    ]
    srow = " | ".join(_pct(src[d]) for d in targets)
    src_hmean = harmonic_mean([src[d] for d in targets])  # ``src`` also holds the source domain
    lines.append(f"| source (no adaptation) | FP32 | {srow} | {srow} | {_pct(src_hmean)} | |")
    fp = results["fp"]
    lines.append(
        f"| experts, BN folded, averaged{', recalibrated (bn)' if mode.startswith('bn') else ''} | FP32 | " + " | ".join(_pct(fp["experts"][d]) for d in targets) + " | "
        + " | ".join(_pct(fp["merged"][d]) for d in targets) + f" | {_pct(fp['merged']['hmean'])} | |"
    )
    mix = results.get("fp_bn_mixture")
    if mix:
        lines.append(
            "| experts, BN statistics mixed | FP32 | " + " | ".join("" for _ in targets) + " | "
            + " | ".join(_pct(mix[d]) for d in targets) + f" | {_pct(mix['hmean'])} | |"
        )
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {_bits(r)} | " + " | ".join(_pct(r["experts"][d]) for d in targets) + " | "
            + " | ".join(_pct(r["merged"][d]) for d in targets)
            + f" | {_merged(r['merged'])} | {r.get('seconds_per_expert', r['seconds'] / len(targets)):.1f} |"
        )
    src_name = next(k for k in src if k not in targets and k not in ("hmean", "iou"))
    lines += ["", f"Source model on its own test split ({src_name}): {_pct(src[src_name])}%.", "",
              f"![merged hmean against bit width]({HMEAN_PNG})", "",
              f"![merged model against the experts per domain and bit width]({EXPERTS_PNG})", ""]
    return "\n".join(lines)


def _iou(x: float | None) -> str:
    return "–" if x is None else _pct(x)


def seg_run_markdown(results: dict[str, Any]) -> str:
    """The HDRQ paper's Table 1 in shape: per target, every class's IoU and the mIoU of the source
    model, the full-precision experts and merge and each method's merged model; then the mIoU per
    target and their harmonic mean H, the quantized experts beside them."""
    targets, classes = results["targets"], results.get("classes") or []
    src, fp = results["source"], results["fp"]
    mode = (results.get("config") or {}).get("merge", {}).get("recalibrate") or "none"
    recal = ("without data (`merge.recalibrate: none`)" if mode == "none" else
             f"then re-estimated on the targets' unlabeled calibration images (`merge.recalibrate: {mode}`)")
    rounding = (results.get("config") or {}).get("merge", {}).get("rounding", "float")
    lines = [f"# {results['benchmark']}: quantize each expert, then merge (segmentation, seed {results['seed']}, "
             f"preset {results.get('preset', '?')})", "",
             f"IoU and mIoU in % (mmsegmentation's data-set mIoU, ignore label 255; – = class absent from the "
             f"domain). Merged {recal}, rounding `{rounding}`; a sampling rounding's numbers are the mean over its "
             "merges (± their SD). First convolution and classifier at 8 bits, classifier output in float.", ""]
    for d in targets:
        head = [c[:6] for c in classes] or [str(k) for k in range(len(fp["experts_iou"][d]))]
        lines += [f"## {d}", "", "| model | bits | " + " | ".join(head) + " | mIoU |", "|---|---|" + "---:|" * (len(head) + 1)]
        table = [("source (no adaptation)", "FP32", src["iou"][d], src[d]),
                 ("expert (DACS)", "FP32", fp["experts_iou"][d], fp["experts"][d]),
                 ("experts merged", "FP32", fp["merged"]["iou"][d], fp["merged"][d])]
        table += [(f"{r['method']} merged", _bits(r), r["merged"]["iou"][d], r["merged"][d]) for r in results["rows"]]
        for name, bits, iou, miou in table:
            lines.append(f"| {name} | {bits} | " + " | ".join(_iou(x) for x in iou) + f" | **{_pct(miou)}** |")
        lines.append("")
    free = any("merged_data_free" in r for r in results["rows"])
    lines += ["## mIoU per target and H", "",
              "| model | bits | " + " | ".join(f"{d} expert" for d in targets) + " | "
              + " | ".join(f"{d} merged" for d in targets) + " | H (merged) |" + (" H (data-free merge) |" if free else "")
              + " s/expert |", "|---|---|" + "---:|" * (2 * len(targets) + 2 + free)]
    srow = " | ".join(_pct(src[d]) for d in targets)
    blank = " |" if free else ""
    lines.append(f"| source (no adaptation) | FP32 | {srow} | {srow} | {_pct(harmonic_mean([src[d] for d in targets]))} |"
                 f"{blank} |")
    lines.append("| experts merged | FP32 | " + " | ".join(_pct(fp["experts"][d]) for d in targets) + " | "
                 + " | ".join(_pct(fp["merged"][d]) for d in targets) + f" | {_pct(fp['merged']['hmean'])} |{blank} |")
    for r in results["rows"]:
        extra = f" {_merged(r['merged_data_free'])} |" if "merged_data_free" in r else blank
        lines.append(f"| {r['method']} | {_bits(r)} | " + " | ".join(_pct(r["experts"][d]) for d in targets) + " | "
                     + " | ".join(_pct(r["merged"][d]) for d in targets)
                     + f" | {_merged(r['merged'])} |{extra} {r.get('seconds_per_expert', r['seconds'] / len(targets)):.1f} |")
    lines += ["", f"![merged H against bit width]({HMEAN_PNG})", ""]
    lines += [f"![{d}: images, labels, predictions](strip_{d}.png)" for d in targets] + [""]
    return "\n".join(lines)


def pmq_markdown(results: dict[str, Any]) -> str:
    """Merged hmean per merge method and bit width, one column per PTQ method."""
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"# Merge, then quantize ({results['benchmark']}, seed {results['seed']})", "",
             "Merged hmean in % (full-precision merged model in the first column).", "",
             "| merge | bits | FP merged | " + " | ".join(methods) + " |",
             "|---|---|---:|" + "---:|" * len(methods)]
    for m, w, a in dict.fromkeys((r["merge"], r["w_bits"], r["a_bits"]) for r in rows):
        rs = {r["method"]: r for r in rows if (r["merge"], r["w_bits"], r["a_bits"]) == (m, w, a)}
        fp = next(iter(rs.values()))["fp_merged"]["hmean"]
        cols = " | ".join(_pct(rs[x]["merged"]["hmean"]) if x in rs else "" for x in methods)
        lines.append(f"| {m} | {_bits(next(iter(rs.values())))} | {_pct(fp)} | {cols} |")
    lines += ["", f"![merged hmean against bit width]({HMEAN_PNG})", ""]
    return "\n".join(lines)


def tta_markdown(results: dict[str, Any]) -> str:
    """One table per stream: rows method x bits, columns corruptions and mean error (%); the lowest
    mean error per bit width in bold."""
    corr = results["corruptions"]
    lines = [f"TTA on the corruption stream (severity {results['severity']}, seed {results['seed']}, "
             f"preset {results['preset']}): error in %, mean over the {len(corr)} corruptions.", ""]
    for stream, imb in results["streams"].items():
        rows = [r for r in results["rows"] if r["stream"] == stream]
        if not rows:
            continue
        lines += [f"### {stream} stream" + (f" ({imb})" if imb else ""), ""]
        lines.append("| method | bits | " + " | ".join(corr) + " | mean |")
        lines.append("|---|---|" + "---:|" * (len(corr) + 1))
        best = {b: min(r["mean_error"] for r in rows if r["bits"] == b) for b in {r["bits"] for r in rows}}
        for r in rows:
            cells = " | ".join(f"{100 * r['error'][c]:.1f}" for c in corr)
            mean = f"{100 * r['mean_error']:.1f}"
            mean = f"**{mean}**" if r["mean_error"] == best[r["bits"]] else mean
            lines.append(f"| {r['method']} | {r['bits']} | {cells} | {mean} |")
        lines.append("")
    lines += ["![error along the stream](stream_error.png)", ""]
    return "\n".join(lines)


def bench_markdown(results: dict[str, Any]) -> str:
    """Paper Table 2 form: merged hmean (mean ± std over seeds), own-domain expert accuracy in
    parentheses, one table per target set, best mean per column in bold; a first row with the
    full-precision merge of the same experts."""
    lines = []
    cells = results["rows"]
    for targets in dict.fromkeys(tuple(r["targets"]) for r in cells):
        rs = [r for r in cells if tuple(r["targets"]) == targets]
        bits = list(dict.fromkeys(r["bits"] for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        seeds = sorted({r["seed"] for r in rs})
        cell = {(m, b): [r for r in rs if r["method"] == m and r["bits"] == b] for m in methods for b in bits}
        best = {b: max(statistics.mean(r["merged"]["hmean"] for r in cell[(m, b)]) for m in methods if cell[(m, b)])
                for b in bits}
        lines += [f"Targets {', '.join(targets)}; seeds {seeds}. Merged hmean % (mean ± std over seeds), "
                  "quantized experts' own-domain accuracy % in parentheses.", "",
                  "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
        fp = {r["seed"]: r["fp_merged"]["hmean"] for r in rs if "fp_merged" in r}
        if fp:  # one full-precision merge per seed (the same in every column)
            lines.append("| full precision (merged) | " + " | ".join([_mean_sd(list(fp.values()))] * len(bits)) + " |")
        for m in methods:
            cols = []
            for b in bits:
                sel = cell[(m, b)]
                if not sel:
                    cols.append("")
                    continue
                h = [r["merged"]["hmean"] for r in sel]
                text = _mean_sd(h)
                if statistics.mean(h) == best[b]:
                    text = f"**{text}**"
                exp_acc = statistics.mean(statistics.mean(r["experts"].values()) for r in sel)
                cols.append(f"{text} ({100 * exp_acc:.1f})")
            lines.append(f"| {m} | " + " | ".join(cols) + " |")
        lines.append("")
    lines += [f"![merged hmean against bit width]({HMEAN_PNG})", ""]
    return "\n".join(lines)


def bench_csv(cells: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["targets", "seed", "bits", "method", "merged_hmean", "expert_mean", "seconds", "ptq_seed"])
    for r in cells:
        w.writerow(["+".join(r["targets"]), r["seed"], r["bits"], r["method"], f"{r['merged']['hmean']:.4f}",
                    f"{statistics.mean(r['experts'].values()):.4f}", f"{r['seconds']:.1f}", r.get("ptq_seed", "")])
    return buf.getvalue()


MARKDOWN = {"run": run_markdown, "pmq": pmq_markdown, "tta": tta_markdown, "bench": bench_markdown}


def markdown(results: dict[str, Any]) -> str:
    """``results.md`` of any experiment (a segmentation run: :func:`seg_run_markdown`)."""
    kind = results.get("experiment", "run")
    if kind == "run" and results.get("task") == "segmentation":
        return seg_run_markdown(results)
    return MARKDOWN[kind](results)


def hmean_panels(results: dict[str, Any]) -> dict[str, dict]:
    """What ``hmean_vs_bits.png`` shows: per panel, each method's (mean, std) merged hmean per bit
    width and the full-precision merge's hmean."""
    kind, rows = results["experiment"], results["rows"]
    if kind == "run":
        lines: dict = {}
        for r in rows:
            std = r["merged"].get("repeats", {}).get("std", 0.0)
            lines.setdefault(r["method"], {})[_bits(r)] = (r["merged"]["hmean"], std)
        return {"": {"lines": lines, "fp": results["fp"]["merged"]["hmean"]}}
    if kind == "pmq":
        panels: dict = {}
        for r in rows:
            p = panels.setdefault(f"merge: {r['merge']}", {"lines": {}, "fp": r["fp_merged"]["hmean"]})
            p["lines"].setdefault(r["method"], {})[_bits(r)] = (r["merged"]["hmean"], 0.0)
        return panels
    panels = {}
    for targets in dict.fromkeys(tuple(r["targets"]) for r in rows):
        rs = [r for r in rows if tuple(r["targets"]) == targets]
        lines = {}
        for m in dict.fromkeys(r["method"] for r in rs):
            for b in dict.fromkeys(r["bits"] for r in rs):
                h = [r["merged"]["hmean"] for r in rs if r["method"] == m and r["bits"] == b]
                if h:
                    lines.setdefault(m, {})[b] = (statistics.mean(h), statistics.stdev(h) if len(h) > 1 else 0.0)
        fp = {r["seed"]: r["fp_merged"]["hmean"] for r in rs if "fp_merged" in r}
        panels[f"targets: {', '.join(targets)}"] = {"lines": lines,
                                                    "fp": statistics.mean(fp.values()) if fp else None}
    return panels


def expert_panels(results: dict[str, Any]) -> dict[str, dict[str, tuple[dict, dict]]]:
    """What ``merged_vs_experts.png`` shows: per bit width (full precision first), per method, the
    experts' own-domain accuracies and the merged model's."""
    panels: dict = {"FP32": {"full precision": (results["fp"]["experts"], results["fp"]["merged"])}}
    for r in results["rows"]:
        panels.setdefault(_bits(r), {})[r["method"]] = (r["experts"], r["merged"])
    return panels


def pictures(results: dict[str, Any], out: Path) -> None:
    """The experiment's PNGs in ``out`` (none before its first row)."""
    from ..eval.plots import plot_hmean_vs_bits, plot_merged_vs_experts, plot_stream_errors

    if not results["rows"]:
        return
    seed = results.get("seed", "")
    if results["experiment"] == "tta":
        plot_stream_errors(results["rows"], out / "stream_error.png",
                           f"error along the corruption stream (severity {results['severity']}, seed {seed})")
        return
    if results["experiment"] == "bench":
        atomic_write_text(out / "bench.csv", bench_csv(results["rows"]))
    if results["experiment"] == "run" and results.get("preview"):
        from ..eval.strips import plot_strips

        preds = {d: {"FP merged": results["fp"]["merged"]["preview"][d],
                     **{f"{r['method']} {_bits(r)}": r["merged"]["preview"][d] for r in results["rows"]
                        if "preview" in r["merged"]}} for d in results["targets"]}
        plot_strips(results["preview"], preds, out, results.get("classes"))
    if results["experiment"] == "run":
        plot_merged_vs_experts(expert_panels(results), results["targets"], out / EXPERTS_PNG,
                               f"{results.get('benchmark', '')}: merged model (bars) against each expert on its own "
                               f"domain (◆), seed {seed}")
    title = {"run": "quantize, then merge", "pmq": "merge, then quantize", "bench": "quantize, then merge"}
    bench = results.get("benchmark")
    plot_hmean_vs_bits(hmean_panels(results), out / HMEAN_PNG,
                       (f"{bench}: " if bench else "") + title[results["experiment"]]
                       + (f" (seed {seed})" if seed != "" else ""))
