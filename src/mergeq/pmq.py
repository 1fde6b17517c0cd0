"""Merge, then quantize (the E-PMQ setting): merge the full-precision experts (average,
task_arithmetic, ties), quantize the one merged model (rtn, gptq, epmq), evaluate per domain.

Experts and the source are BN-folded first, so every merge acts on folded weights. The
merged model is calibrated on the union of the targets' calibration splits (an equal share of
``calib_size`` from each); E-PMQ also gets each expert with its own domain's split.
Rows match ``mergeq run``'s results.json rows, plus a ``merge`` field. Per-method options come
from the config's ``ptq_options`` (e.g. ``gptq: {group_size: 32, act_order: true}``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import RunConfig
from .eval import accuracy, evaluate
from .io import atomic_write_text, check_out_dir, write_json
from .merge import MERGE_METHODS, merge
from .nn import fold_bn
from .pipeline import Experiment
from .ptq import quantize
from .quant import QuantConfig, parse_bits

MERGE_DEFAULTS: dict[str, dict[str, Any]] = {"average": {}, "task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2}}


def run_pmq(config: RunConfig, out: str | Path, merges: Sequence[str] = ("task_arithmetic", "ties"),
            methods: Sequence[str] = ("rtn", "gptq", "epmq"), anchor: float = 1.0,
            progress: bool = False) -> dict[str, Any]:
    out = check_out_dir(out)  # checked, like the merge names, before any model is trained
    for name in merges:
        MERGE_METHODS.get(name)
    if not anchor >= 0:
        raise ValueError(f"anchor must be >= 0, got {anchor!r}")
    exp = Experiment(config, progress)
    cfg = exp.cfg
    example = exp.bench.source.test.tensors[0][:2]
    experts = [fold_bn(exp.experts[d], example) for d in exp.targets]
    source = fold_bn(exp.source, example)
    share = max(1, cfg.calib_size // len(exp.targets))
    calib = [exp.bench.targets[d].train.tensors[0][:share] for d in exp.targets]
    results: dict[str, Any] = {"benchmark": exp.bench.name, "targets": exp.targets, "seed": cfg.seed,
                               "preset": cfg.preset, "setting": "merge-then-quantize",
                               "fp_experts": {d: accuracy(e, exp.tests[d], device=cfg.device)
                                              for d, e in zip(exp.targets, experts)},
                               "rows": []}
    for merge_method in merges:
        opts = dict(MERGE_DEFAULTS.get(merge_method, {}))
        if merge_method != "average":
            opts["base"] = source
        merged = merge(experts, merge_method, **opts)
        fp = evaluate(merged, exp.tests, cfg.device)
        for spec in cfg.bits:
            w_bits, a_bits = parse_bits(spec)
            qcfg = QuantConfig(w_bits, a_bits, cfg.first_last_bits, cfg.step_method)
            for method in methods:
                extra = dict(cfg.ptq_options.get(method, {}))  # e.g. group_size, act_order from the YAML config
                if method == "epmq":
                    extra.update(experts=experts, expert_calib=calib, anchor=anchor)
                t0 = time.perf_counter()
                torch.manual_seed(cfg.seed)
                q = quantize(merged, method, calib=torch.cat(calib), config=qcfg, calib_size=None,
                             device=cfg.device, seed=cfg.seed, **extra)
                results["rows"].append({
                    "merge": merge_method, "method": method, "w_bits": w_bits, "a_bits": a_bits,
                    "fp_merged": fp, "merged": evaluate(q, exp.tests, cfg.device),
                    "seconds": time.perf_counter() - t0,
                })
                write_json(out / "results.json", results)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_text(out / "results.md", pmq_markdown(results))
    return results


def pmq_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Merge, then quantize ({results['benchmark']}, seed {results['seed']})", "",
             "Merged hmean in % (full-precision merged model in the first column).", "",
             "| merge | bits | FP merged | " + " | ".join(dict.fromkeys(r["method"] for r in results["rows"])) + " |"]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    lines.append("|---|---|---:|" + "---:|" * len(methods))
    keys = list(dict.fromkeys((r["merge"], r["w_bits"], r["a_bits"]) for r in results["rows"]))
    for m, w, a in keys:
        rs = {r["method"]: r for r in results["rows"] if (r["merge"], r["w_bits"], r["a_bits"]) == (m, w, a)}
        fp = next(iter(rs.values()))["fp_merged"]["hmean"]
        cols = " | ".join(f"{100 * rs[x]['merged']['hmean']:.1f}" if x in rs else "" for x in methods)
        lines.append(f"| {m} | W{w}A{a if a is not None else 32} | {100 * fp:.1f} | {cols} |")
    return "\n".join(lines) + "\n"
