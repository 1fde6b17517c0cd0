"""Quantize, then adapt at test time (TTAQ's setting, arXiv 2412.09899 Sec. 4; CoTTA's protocol): ``mergeq tta``.

The source model of the config (the pool's, trained on ``data``'s source domain) meets a stream
of domains one after another with no reset, once class-balanced and once class-imbalanced
(``tta.streams``; ``tta.imbalance``: the label order of the imbalanced one). The domains are the
ImageNet-C corruptions (``tta.corruptions``, ``tta.severity``) applied to the source domain's
clean test split (``tta.n_images`` of it), or, with ``tta.cifar10c: FOLDER``, the CIFAR-10-C
arrays there; either way normalised as ``data`` normalises its images. Methods
(``tta.methods``; ``MODEL[+ADAPTER]``, ADAPTER in none | tent | abl):

* ``fp``, ``fp+tent``: the full-precision model without / with TENT;
* ``qdrop``, ``qdrop+tent``: QDrop PTQ without / with TENT;
* ``ttaq``: the ``ttaq`` PTQ method (QDrop + PEM + PCR) adapted by TENT with ABL (``ttaq+abl``).

Any PTQ method can stand in for MODEL (``hdrq+tent``, ``ttaq+tent``, ``qdrop+abl`` for ablations).
Every quantized model keeps BatchNorm unfolded (``QuantConfig(fold_bn=False)``), with or
without adaptation, so the rows differ only in what the row names; first and last layer at
``ptq.first_last_bits``. PTQ calibrates on the clean source training split (as the paper
calibrates on clean data). Each quantized model is built once per bit width and adapted on a
fresh copy per stream. Files and resume: :mod:`mergeq.experiments.store`.

results.json: {"experiment": "tta", "benchmark", "seed", "severity", "preset", "corruptions",
"streams": {name: imbalance}, "rows": [{"stream", "bits", "method", "error": {domain: e},
"mean_error", "batch_error", "batch_domain", "class_error", "seconds", "seconds_stream"}]},
errors as fractions; also ``stream_error.png`` (error along the stream per method).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import TensorDataset

from ..adapt.tta import ABL, NoAdapt, Tent, run_stream
from ..data.corruptions import check_corruptions, corruption_stream, load_cifar10c
from ..data.digits import load_digits_benchmark
from ..data.folder import normalizer
from ..data.spec import DigitsData, load_data
from ..data_utils import take
from ..ptq import quantize
from ..quant.config import parse_bits
from ..sysinfo import environment
from .config import Config, parse_tta_method
from .pool import Pool
from .store import RunDir

FP = "FP32"


def plan(cfg: Config) -> list[tuple[str, str, str]]:
    """(stream, method, bits) of every row, FP rows once per stream (bits ``FP32``); grouped by bits
    so each quantized model is built once."""
    t = cfg.tta
    fp = [m for m in t.methods if parse_tta_method(m)[0] == "fp"]
    quantized = [m for m in t.methods if parse_tta_method(m)[0] != "fp"]
    rows = [(s, m, FP) for s in t.streams for m in fp]
    return rows + [(s, m, b) for b in t.bits for s in t.streams for m in quantized]


def imbalance(cfg: Config, stream: str) -> str | None:
    return None if stream == "balanced" else cfg.tta.imbalance


class TTARows:
    """The streams and the quantized models of one pool, built on demand; one row at a time."""

    def __init__(self, pool: Pool, progress: bool = False) -> None:
        self.pool, self.cfg, self.progress = pool, pool.cfg, progress
        self._streams: dict[str, list] = {}
        self._quantized: dict[tuple[str, str], torch.nn.Module] = {}

    def _clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The source domain's test images in [0, 1] and their labels (``tta.n_images`` of them)."""
        data, seed, n = self.cfg.data, self.pool.seed, self.cfg.tta.n_images
        if isinstance(data, DigitsData):
            x, y = load_digits_benchmark(seed=seed, targets=[], normalize=False, source=data.source).source.test.tensors
            return x[:n], y[:n]
        raw = load_data({**dataclasses.asdict(data), "normalize": "none", "in_memory": False, "targets": []}, seed,
                        self.pool.cache_dir)
        test = raw.source.test
        return take(test, range(min(n or len(test), len(test))))

    def stream(self, name: str) -> list:
        if name not in self._streams:
            t, seed = self.cfg.tta, self.pool.seed
            normalize = normalizer(getattr(self.cfg.data, "normalize", "standardize"))
            if t.cifar10c is None:
                x, y = self._clean()
                self._streams[name] = corruption_stream(
                    x, y, t.severity, t.corruptions, seed, imbalance(self.cfg, name), alpha=t.dirichlet_alpha,
                    cache_dir=Path(self.pool.cache_dir), normalize=normalize)
            else:
                raw = load_cifar10c(t.cifar10c, t.corruptions, t.severity, t.n_images, imbalance(self.cfg, name), seed,
                                    "none", t.dirichlet_alpha)
                self._streams[name] = [(d, TensorDataset(normalize(ds.tensors[0]), ds.tensors[1])) for d, ds in raw]
        return self._streams[name]

    def model(self, base: str, bits: str) -> torch.nn.Module:
        pool = self.pool
        if base == "fp":
            return pool.source
        key = (base, bits)
        if key not in self._quantized:
            self._quantized[key] = quantize(pool.source, base, calib=pool.calib(pool.bench.source.name),
                                            config=pool.qconfig(parse_bits(bits), fold_bn=False),
                                            calib_size=self.cfg.ptq.calib_size, device=pool.device,
                                            seed=pool.seeds["ptq"],
                                            progress=self.progress, **pool.options(base))
        return self._quantized[key]

    def adapter(self, model: torch.nn.Module, kind: str):
        if kind == "none":
            return NoAdapt(copy.deepcopy(model))
        abl = ABL(self.pool.bench.num_classes, self.cfg.tta.abl) if kind == "abl" else None
        return Tent(model, self.cfg.tta.tent, abl=abl)  # adapts a copy

    def row(self, stream: str, method: str, bits: str) -> dict[str, Any]:
        base, kind = parse_tta_method(method)
        t0 = time.perf_counter()
        model = self.model(base, bits)
        t1 = time.perf_counter()
        torch.manual_seed(self.pool.seed)
        res = run_stream(self.adapter(model, kind), self.stream(stream), self.cfg.tta.batch_size, self.pool.device,
                         progress=self.progress, desc=f"{method} {bits} {stream}")
        return {"stream": stream, "bits": bits, "method": method, **res,
                "seconds": time.perf_counter() - t0, "seconds_stream": time.perf_counter() - t1}


def images_used(pool: Pool) -> Config:
    """``pool.cfg`` with ``tta.n_images`` no larger than the images each domain of the stream has
    (the source test split, or the CIFAR-10-C arrays' images per severity): the number the run
    uses, so that config.yaml records it. Null (all of them) stays null."""
    t = pool.cfg.tta
    if t.n_images is None:
        return pool.cfg
    if t.cifar10c is None:
        have = len(pool.bench.source.test)
    else:
        have = len(load_cifar10c(t.cifar10c, check_corruptions(t.corruptions)[:1], t.severity, t.n_images,
                                 normalize="none")[0][1])
    return dataclasses.replace(pool.cfg, tta=dataclasses.replace(t, n_images=min(t.n_images, have)))


def run_tta(config: Config, out: str | Path, progress: bool = False,
            on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every (stream, method, bits) row of ``config.tta`` into ``out`` (resuming what is there)."""
    store = RunDir(out, "tta")
    with store.locked():
        return _fill(store, config, progress, on_row)


def _fill(store: RunDir, config: Config, progress: bool, on_row: Callable[[dict], None] | None) -> dict[str, Any]:
    """The rows of ``config`` into ``store``, under its lock on ``--out``."""
    pool = Pool(config, progress)
    pool.cfg = images_used(pool)
    cfg, done = store.begin(pool.cfg)
    pool.check_source()
    rows = TTARows(pool, progress)
    t = cfg.tta
    results: dict[str, Any] = {
        "benchmark": pool.bench.name, "seed": pool.seed, "severity": t.severity, "preset": cfg.preset,
        "corruptions": check_corruptions(t.corruptions), "streams": {s: imbalance(cfg, s) for s in t.streams},
        "machine": environment(), "rows": [],
    }
    return store.fill(results, plan(cfg), done, set(plan(pool.cfg)), lambda key: rows.row(*key), on_row)
