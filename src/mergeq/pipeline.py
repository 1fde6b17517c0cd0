"""The quantize-then-merge pipeline (HDRQ's setting, paper Sec. 3 and 5).

source --SHOT--> expert per target --PTQ--> quantized experts --average--> one low-bit model,
evaluated per target domain with the harmonic mean. ``run`` writes ``results.json``
(schema below), ``results.md`` and the resolved ``config.yaml`` into the output folder,
saving after every row so an interrupted run resumes where it stopped. A run into a folder
that holds rows of a run with other methods or bits keeps them: ``config.yaml`` then lists the
union of methods and bits and ``results.json`` every finished row; any other difference of
settings is refused with the differing keys named, so no row is ever dropped.

results.json: {"benchmark", "targets", "seed", "fp": {"experts": {d: acc}, "merged": {d: acc,
"hmean"}}, "rows": [{"method", "w_bits", "a_bits", "experts": {d: acc}, "merged": {d: acc,
"hmean"}, "seconds"}]} plus "source" (the source model before adaptation) and
"fp_bn_mixture" (merge of unfolded experts with mixed BN statistics).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import RunConfig
from .data import load_benchmark
from .eval import accuracy, evaluate
from .errors import MergeqError
from .io import atomic_write_text, check_out_dir, config_diff, earlier_results, write_json
from .merge import merge
from .nn import fold_bn
from .ptq import ptq_options, quantize
from .quant.config import QuantConfig, parse_bits
from .report import results_markdown
from .zoo import ModelPool

log = logging.getLogger(__name__)


class Experiment:
    """The benchmark, source model and SHOT experts of one resolved config, ready to quantize."""

    def __init__(self, config: RunConfig, progress: bool = False) -> None:
        self.cfg = cfg = config.resolved()
        self.progress = progress
        cfg.apply_threads()
        torch.manual_seed(cfg.seed)
        self.bench = load_benchmark(cfg.benchmark, seed=cfg.seed, targets=cfg.targets)
        self.targets = list(self.bench.targets)
        self.tests = {d: self.bench.targets[d].test for d in self.targets}
        pool = ModelPool(self.bench, cfg.arch, cfg.arch_kwargs, cfg.source, cfg.shot, cfg.seed, cfg.cache_dir,
                         cfg.device, progress)
        self.source = pool.source()
        self.experts = {d: pool.expert(d) for d in self.targets}

    def fp_merged(self) -> dict[str, float]:
        """Accuracy of the BN-folded full-precision experts, averaged (the reference of every row)."""
        example = self.bench.source.test.tensors[0][:2].to(self.cfg.device)
        folded = [fold_bn(self.experts[d], example) for d in self.targets]
        return evaluate(merge(folded), self.tests, self.cfg.device)

    def fp_results(self) -> dict[str, Any]:
        cfg, bench, tests = self.cfg, self.bench, self.tests
        return {
            "source": evaluate(self.source, {bench.source.name: bench.source.test, **tests}, cfg.device),
            "fp": {
                "experts": {d: accuracy(self.experts[d], tests[d], device=cfg.device) for d in self.targets},
                "merged": self.fp_merged(),
            },
            "fp_bn_mixture": evaluate(merge(list(self.experts.values())), tests, cfg.device),
        }

    def quantize_experts(self, method: str, qcfg: QuantConfig, **overrides: Any) -> dict[str, torch.nn.Module]:
        """Each expert quantized on its own target's calibration split."""
        cfg = self.cfg
        options = {**ptq_options(method, cfg.preset), **cfg.ptq_options.get(method, {}), **overrides}
        return {
            d: quantize(m, method, calib=self.bench.targets[d].train, config=qcfg, source=self.source,
                        calib_size=cfg.calib_size, device=cfg.device, seed=cfg.seed, progress=self.progress,
                        **options)
            for d, m in self.experts.items()
        }

    def merge_and_evaluate(self, models: list[torch.nn.Module], rounding: str | None = None,
                           **options: Any) -> dict[str, float]:
        rounding = rounding or self.cfg.rounding
        opts = rounding_options(rounding, {**self.cfg.merge_options, **options}, self.cfg.seed)
        return evaluate(merge(models, rounding=rounding, **opts), self.tests, self.cfg.device)

    def row(self, method: str, qcfg: QuantConfig, **overrides: Any) -> dict[str, Any]:
        """Quantize every expert, merge them, evaluate: one row of ``results.json``."""
        t0 = time.perf_counter()
        qexperts = self.quantize_experts(method, qcfg, **overrides)
        seconds = time.perf_counter() - t0
        return {
            "method": method,
            "w_bits": qcfg.w_bits,
            "a_bits": qcfg.a_bits,
            "experts": {d: accuracy(q, self.tests[d], device=self.cfg.device) for d, q in qexperts.items()},
            "merged": self.merge_and_evaluate(list(qexperts.values())),
            "seconds": seconds,
            "seconds_per_expert": seconds / len(qexperts),
        }


def rounding_options(rounding: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """The sampling policies (noise, noise-ties) draw with the run's seed unless told otherwise."""
    return {"seed": seed, **options} if rounding.startswith("noise") else dict(options)


_ROW_AXES = ("methods", "bits", "ptq_options")


def resume_plan(cfg: RunConfig, out: Path) -> tuple[RunConfig, dict[tuple, dict]]:
    """The config to record in ``out`` and the rows already there, by (method, w_bits, a_bits).

    Rows of an earlier run are kept if it differs from ``cfg`` at most in methods and bits (the
    config returned then holds the union of both); any other difference raises a MergeqError
    naming the differing keys."""
    earlier = earlier_results(out)
    if earlier is None:
        return cfg, {}
    old, rows = earlier
    old_methods, old_bits = list(old.get("methods") or []), list(old.get("bits") or [])
    common = [m for m in cfg.methods if m in old_methods]

    def settings(d: dict) -> dict:
        opts = d.get("ptq_options") or {}
        return {**{k: v for k, v in d.items() if k not in _ROW_AXES}, "ptq_options": {m: opts.get(m) for m in common}}

    diff = config_diff(settings(old), settings(yaml.safe_load(cfg.to_yaml())))
    if diff:
        raise MergeqError(f"{out} holds results of a run with other settings ({', '.join(diff)} differ); its rows "
                          "would be mixed with new ones: use another --out, or these keys as they were there")
    union = dataclasses.replace(
        cfg, methods=list(dict.fromkeys([*old_methods, *cfg.methods])),
        bits=list(dict.fromkeys([*old_bits, *cfg.bits])),
        ptq_options={**(old.get("ptq_options") or {}), **cfg.ptq_options})
    return union, {(r["method"], r["w_bits"], r["a_bits"]): r for r in rows}


def run(config: RunConfig, out: str | Path, progress: bool = False,
        on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; return the results dict (also written to ``out``).

    ``out`` and the earlier results in it are checked before any model is trained."""
    requested = config.resolved()
    out = check_out_dir(out)
    cfg, previous = resume_plan(requested, out)
    todo = {(m, *parse_bits(b)) for m in requested.methods for b in requested.bits}
    exp = Experiment(cfg, progress)
    config_yaml = cfg.to_yaml()
    atomic_write_text(out / "config.yaml", config_yaml)
    results: dict[str, Any] = {
        "benchmark": exp.bench.name, "targets": exp.targets, "seed": cfg.seed, "preset": cfg.preset,
        **exp.fp_results(), "rows": [],
    }

    done = dict(previous)
    keys = list(dict.fromkeys((m, *parse_bits(b)) for b in cfg.bits for m in cfg.methods))

    def save() -> None:  # every finished row, earlier ones included, in the config's order
        results["rows"] = [done[k] for k in dict.fromkeys([*keys, *done]) if k in done]
        write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_markdown(results))

    for key in keys:
        method, w_bits, a_bits = key
        if key in done:
            log.info("resuming: %s %s already done", method, QuantConfig(w_bits, a_bits).tag)
        elif key in todo:
            done[key] = exp.row(method, QuantConfig(w_bits, a_bits, cfg.first_last_bits, cfg.step_method))
        else:  # a row of the union config that neither run asked for
            continue
        save()
        if on_row:
            on_row(done[key])
    save()
    return results
