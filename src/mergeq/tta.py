"""The quantize-then-adapt experiment (TTAQ's setting, arXiv 2412.09899 Sec. 4; CoTTA's protocol).

The source model of the run config (the cached ``mnist`` source model, ``zoo.ModelPool``) meets
the stream of the 15 ImageNet-C corruptions applied to its clean test split (``data.corruptions``),
one domain after another with no reset, once class-balanced and once class-imbalanced. Methods
(``--methods``; ``MODEL[+ADAPTER]``, ADAPTER in none | tent | abl):

* ``fp``, ``fp+tent``: the full-precision model without / with TENT;
* ``qdrop``, ``qdrop+tent``: QDrop PTQ without / with TENT;
* ``ttaq``: the ``ttaq`` PTQ method (QDrop + PEM + PCR) adapted by TENT with ABL (``ttaq+abl``).

Any PTQ method can stand in for MODEL (``hdrq+tent``, ``ttaq+tent``, ``qdrop+abl`` for ablations).
Every quantized model keeps BatchNorm unfolded (``QuantConfig(fold_bn=False)``), with or
without adaptation, so the rows differ only in what the row names; first and last layer at
``first_last_bits`` (8). PTQ calibrates on the clean source training split (as the paper
calibrates on clean data). Each quantized model is built once per bit width and adapted on a
fresh copy per stream.

Writes into ``out``: ``results.json`` ({"benchmark", "seed", "severity", "preset", "corruptions",
"streams": {name: imbalance}, "rows": [{"stream", "bits", "method", "error": {corruption: e},
"mean_error", "batch_error", "batch_domain", "class_error", "seconds"}]}, errors as fractions),
``results.md`` (one table per stream: rows method x bits, columns corruptions + mean, in %),
``config.yaml`` (``run``: the resolved RunConfig, ``tta``: :class:`TTAConfig`) and
``stream_error.png`` (error along the stream per method). Rows are saved as they finish; a
rerun with the same config in the same folder skips the rows already there.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .adapt.tta import ABL, ABLConfig, NoAdapt, Tent, TentConfig, run_stream
from .config import RunConfig
from .data import load_benchmark
from .data.corruptions import CORRUPTIONS, IMBALANCE, check_corruptions, check_severity, corruption_stream
from .errors import MergeqError
from .io import atomic_write_text, check_out_dir, config_diff, earlier_results, write_json
from .ptq import PTQ_METHODS, ptq_options, quantize
from .quant.config import QuantConfig, parse_bits
from .zoo import ModelPool

log = logging.getLogger(__name__)

DEFAULT_METHODS = ["fp", "fp+tent", "qdrop", "qdrop+tent", "ttaq"]
ADAPTERS = ("none", "tent", "abl")
FP = "FP32"


def parse_method(spec: str) -> tuple[str, str]:
    """``"qdrop+tent"`` -> ("qdrop", "tent"); ``"ttaq"`` -> ("ttaq", "abl"); ``"fp"`` -> ("fp", "none")."""
    base, _, adapter = spec.strip().partition("+")
    adapter = adapter or ("abl" if base == "ttaq" else "none")
    if adapter not in ADAPTERS:
        raise ValueError(f"method {spec!r}: adapter must be one of {ADAPTERS}")
    if base != "fp":
        PTQ_METHODS.get(base)  # KeyError naming the known methods
    return base, adapter


@dataclass
class TTAConfig:
    """What ``mergeq tta`` adds to the run config."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    bits: list[str] = field(default_factory=lambda: ["W4A4", "W2A4"])
    streams: list[str] = field(default_factory=lambda: ["balanced", "imbalanced"])
    imbalance: str = "dirichlet"  # what the "imbalanced" stream is: sorted | dirichlet
    dirichlet_alpha: float = 0.1
    severity: int = 5
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    n_images: int | None = None  # None: all 500 clean test images
    batch_size: int = 64
    tent: TentConfig = field(default_factory=TentConfig)
    abl: ABLConfig = field(default_factory=ABLConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tent, dict):
            self.tent = TentConfig(**self.tent)
        if isinstance(self.abl, dict):
            self.abl = ABLConfig(**self.abl)
        if not self.methods:
            raise ValueError("tta needs at least one method")
        for m in self.methods:
            parse_method(m)
        for b in self.bits:
            parse_bits(b)
        bad = [s for s in self.streams if s not in ("balanced", "imbalanced")]
        if bad or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of balanced, imbalanced; got {self.streams}")
        if self.imbalance not in [i for i in IMBALANCE if i]:
            raise ValueError(f"imbalance must be 'sorted' or 'dirichlet', got {self.imbalance!r}")
        check_severity(self.severity)
        check_corruptions(self.corruptions)
        if self.batch_size < 1 or (self.n_images is not None and self.n_images < 1):
            raise ValueError(f"need batch_size >= 1 and n_images >= 1, got {self.batch_size}, {self.n_images}")

    def stream_imbalance(self, stream: str) -> str | None:
        return None if stream == "balanced" else self.imbalance


def config_yaml(run_cfg: RunConfig, tta_cfg: TTAConfig) -> str:
    return yaml.safe_dump({"run": run_cfg.to_dict(), "tta": asdict(tta_cfg)}, sort_keys=False)


def load_config(path: str | Path) -> tuple[RunConfig, TTAConfig]:
    """Read a ``config.yaml`` written by :func:`run_tta` back into its two configs."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or "run" not in data or "tta" not in data:
        raise ValueError(f"{path} must hold a mapping with 'run' and 'tta' sections (as written by mergeq tta)")
    return RunConfig.from_dict(data["run"]), TTAConfig(**data["tta"])


def results_markdown(results: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def resolved_run_config(run_cfg: RunConfig, tta_cfg: TTAConfig) -> RunConfig:
    """The run config with the PTQ methods the TTA rows need (what ``config.yaml`` records)."""
    methods = sorted({parse_method(m)[0] for m in tta_cfg.methods} - {"fp"}) or ["qdrop"]
    return dataclasses.replace(run_cfg, methods=methods).resolved()


class TTAExperiment:
    """Source model, calibration data and streams of one config; quantized models on demand."""

    def __init__(self, run_cfg: RunConfig, tta_cfg: TTAConfig, progress: bool = False) -> None:
        self.cfg = cfg = resolved_run_config(run_cfg, tta_cfg)
        self.tta, self.progress = tta_cfg, progress
        cfg.apply_threads()
        torch.manual_seed(cfg.seed)
        self.bench = load_benchmark(cfg.benchmark, seed=cfg.seed, targets=[])
        pool = ModelPool(self.bench, cfg.arch, cfg.arch_kwargs, cfg.source, cfg.shot, cfg.seed, cfg.cache_dir,
                         cfg.device, progress)
        self.source = pool.source()
        self._streams: dict[str, list] = {}
        self._quantized: dict[tuple[str, str], torch.nn.Module] = {}

    def stream(self, name: str):
        if name not in self._streams:
            raw = load_benchmark(self.cfg.benchmark, seed=self.cfg.seed, targets=[], normalize=False)
            x, y = raw.source.test.tensors
            if self.tta.n_images is not None:
                x, y = x[:self.tta.n_images], y[:self.tta.n_images]
            self._streams[name] = corruption_stream(
                x, y, self.tta.severity, self.tta.corruptions, self.cfg.seed, self.tta.stream_imbalance(name),
                alpha=self.tta.dirichlet_alpha, cache_dir=Path(self.cfg.cache_dir))
        return self._streams[name]

    def model(self, base: str, bits: str) -> torch.nn.Module:
        if base == "fp":
            return self.source
        key = (base, bits)
        if key not in self._quantized:
            cfg = self.cfg
            w_bits, a_bits = parse_bits(bits)
            qcfg = QuantConfig(w_bits, a_bits, cfg.first_last_bits, cfg.step_method, fold_bn=False)
            options = {**ptq_options(base, cfg.preset), **cfg.ptq_options.get(base, {})}
            self._quantized[key] = quantize(self.source, base, calib=self.bench.source.train, config=qcfg,
                                            calib_size=cfg.calib_size, device=cfg.device, seed=cfg.seed,
                                            progress=self.progress, **options)
        return self._quantized[key]

    def adapter(self, model: torch.nn.Module, kind: str):
        if kind == "none":
            return NoAdapt(copy.deepcopy(model))
        abl = ABL(self.bench.num_classes, self.tta.abl) if kind == "abl" else None
        return Tent(model, self.tta.tent, abl=abl)  # adapts a copy

    def row(self, stream: str, method: str, bits: str) -> dict[str, Any]:
        base, kind = parse_method(method)
        t0 = time.perf_counter()
        model = self.model(base, bits)
        t1 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        res = run_stream(self.adapter(model, kind), self.stream(stream), self.tta.batch_size, self.cfg.device,
                         progress=self.progress, desc=f"{method} {bits} {stream}")
        return {"stream": stream, "bits": bits, "method": method, **res,
                "seconds": time.perf_counter() - t0, "seconds_stream": time.perf_counter() - t1}


def plan(tta_cfg: TTAConfig) -> list[tuple[str, str, str]]:
    """(stream, method, bits) of every row, FP rows once per stream (bits ``FP32``); grouped by bits
    so each quantized model is built once."""
    rows = []
    fp_methods = [m for m in tta_cfg.methods if parse_method(m)[0] == "fp"]
    q_methods = [m for m in tta_cfg.methods if parse_method(m)[0] != "fp"]
    for s in tta_cfg.streams:
        rows += [(s, m, FP) for m in fp_methods]
    for b in tta_cfg.bits:
        for s in tta_cfg.streams:
            rows += [(s, m, b) for m in q_methods]
    return rows


def run_tta(run_cfg: RunConfig, tta_cfg: TTAConfig, out: str | Path, progress: bool = False,
            on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every (stream, method, bits) row; return the results dict (also written to ``out``)."""
    out = check_out_dir(out)
    text = config_yaml(resolved_run_config(run_cfg, tta_cfg), tta_cfg)
    earlier = earlier_results(out)
    diff = config_diff(earlier[0], yaml.safe_load(text)) if earlier else []
    if diff:
        raise MergeqError(f"{out} holds results of a run with other settings ({', '.join(diff)} differ); "
                          "its rows would be mixed with new ones: use another --out")
    previous = {(r["stream"], r["method"], r["bits"]): r for r in (earlier[1] if earlier else [])}
    exp = TTAExperiment(run_cfg, tta_cfg, progress)
    atomic_write_text(out / "config.yaml", text)
    results: dict[str, Any] = {
        "benchmark": exp.bench.name, "seed": exp.cfg.seed, "severity": tta_cfg.severity, "preset": exp.cfg.preset,
        "corruptions": list(tta_cfg.corruptions),
        "streams": {s: tta_cfg.stream_imbalance(s) for s in tta_cfg.streams}, "rows": [],
    }

    def save(plot: bool = False) -> None:
        from .eval.plots import plot_stream_errors

        write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_markdown(results))
        if plot and results["rows"]:  # ~0.4 s a plot: once at the end
            plot_stream_errors(results["rows"], out / "stream_error.png",
                               f"error along the corruption stream (severity {tta_cfg.severity}, "
                               f"seed {exp.cfg.seed}, batch {tta_cfg.batch_size})")

    todo = plan(tta_cfg)
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc="tta rows", unit="row")
    for key in it:
        if key in previous:
            row = previous[key]
            log.info("resuming: %s %s %s already done", *key)
        else:
            stream, method, bits = key
            row = exp.row(stream, method, bits)
        results["rows"].append(row)
        save()
        if on_row:
            on_row(row)
    save(plot=True)
    return results
