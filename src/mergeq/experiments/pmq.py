"""Merge, then quantize (the E-PMQ setting): ``mergeq pmq``.

The full-precision experts (BN-folded first, as is the source) are merged with every method of
``pmq.merges`` (options: ``merge.options``; ``task_arithmetic`` and ``ties`` around the source);
the one merged model is quantized with every method of ``pmq.methods`` at every bit pair of
``pmq.bits`` (options: ``ptq.options``, e.g. ``gptq: {group_size: 32, act_order: true}``,
``epmq: {anchor: 1.0}``) and evaluated per domain. It is calibrated on the union of the
targets' calibration splits (an equal share of ``ptq.calib_size`` from each); E-PMQ also gets
each expert with its own domain's share. Files and resume: :mod:`mergeq.experiments.store`.

results.json: {"experiment": "pmq", "benchmark", "targets", "seed", "preset", "setting",
"fp_experts": {d: acc}, "rows": [{"merge", "method", "w_bits", "a_bits", "fp_merged": {d: acc,
"hmean"}, "merged": {d: acc, "hmean"}, "seconds"}]}.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..eval import evaluate, score
from ..merge import merge
from ..ptq import quantize
from ..quant.config import parse_bits
from .config import Config, check_average_weights
from .pool import Pool
from .run import header
from .store import RunDir


def plan(cfg: Config) -> list[tuple[str, str, int, int | None]]:
    """(merge, method, w_bits, a_bits) of every row."""
    p = cfg.pmq
    return [(g, m, *parse_bits(b)) for g in p.merges for b in p.bits for m in p.methods]


def run_pmq(config: Config, out: str | Path, progress: bool = False,
            on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every row of ``config.pmq`` into ``out`` (resuming what is there); the results dict."""
    store = RunDir(out, "pmq")
    with store.locked():
        return _fill(store, config, progress, on_row)


def _fill(store: RunDir, config: Config, progress: bool, on_row: Callable[[dict], None] | None) -> dict[str, Any]:
    """The rows of ``config`` into ``store``, under its lock on ``--out``."""
    pool = Pool(config, progress)
    check_average_weights(pool.cfg, len(pool.targets))
    cfg, done = store.begin(pool.cfg)
    pool.check_experts()
    targets, tests, device = pool.targets, pool.tests, pool.device
    experts = [pool.fold(pool.expert(d)) for d in targets]
    share = max(1, pool.cfg.ptq.calib_size // len(targets))
    calib = [pool.calib(d, share) for d in targets]
    fp_experts = {d: score(e, tests[d], device=device) for d, e in zip(targets, experts)}
    results: dict[str, Any] = {**header(pool), "setting": "merge-then-quantize", "fp_experts": fp_experts, "rows": []}
    merged: dict[str, tuple[torch.nn.Module, dict]] = {}

    def merged_model(name: str) -> tuple[torch.nn.Module, dict]:
        if name not in merged:
            opts = dict(pool.cfg.merge.options.get(name, {}))
            if name != "average":
                opts["base"] = pool.fold(pool.source)
            model = merge(experts, name, **opts)
            merged[name] = model, evaluate(model, tests, device)
        return merged[name]

    def compute(key: tuple) -> dict[str, Any]:
        name, method, w_bits, a_bits = key
        model, fp = merged_model(name)
        extra = pool.options(method)
        if method == "epmq":
            extra.update(experts=experts, expert_calib=calib)
        t0 = time.perf_counter()
        torch.manual_seed(pool.seeds["ptq"])
        q = quantize(model, method, calib=torch.cat(calib), config=pool.qconfig((w_bits, a_bits)),
                     calib_size=None, device=device, seed=pool.seeds["ptq"], progress=progress, **extra)
        return {"merge": name, "method": method, "w_bits": w_bits, "a_bits": a_bits, "fp_merged": fp,
                "merged": evaluate(pool.deployed(q), tests, device), "seconds": time.perf_counter() - t0}

    return store.fill(results, plan(cfg), done, set(plan(pool.cfg)), compute, on_row)
