"""Quantize, then merge (HDRQ's setting, paper Sec. 3 and 5): ``mergeq run``.

source --SHOT--> expert per target --PTQ--> quantized experts --average--> one low-bit model,
evaluated per target domain with the harmonic mean. Rows: every method at every bit pair of
``ptq`` (grouped by bits), merged with ``merge.rounding`` (``merge.repeats`` sampling merges
averaged, see :meth:`Pool.merge_and_evaluate`). Files and resume: :mod:`mergeq.experiments.store`.

results.json: {"experiment": "run", "benchmark", "targets", "seed", "preset", "source" (the source
model before adaptation, every domain), "fp": {"experts": {d: acc}, "merged": {d: acc, "hmean"}},
"fp_bn_mixture" (merge of unfolded experts with mixed BN statistics), "rows": [{"method",
"w_bits", "a_bits", "experts": {d: acc}, "ptq": {d: {"changed_codes", "recon_loss": {unit: err}}},
"merged": {d: acc, "hmean"[, "repeats": {"seeds", "hmeans", "std"}]}, "seconds",
"seconds_per_expert"}]}; accuracies are fractions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..eval import accuracy
from ..quant.config import parse_bits
from .config import Config
from .pool import Pool, ptq_report
from .store import RunDir


def plan(cfg: Config) -> list[tuple[str, int, int | None]]:
    """(method, w_bits, a_bits) of every row, grouped by bits."""
    return list(dict.fromkeys((m, *parse_bits(b)) for b in cfg.ptq.bits for m in cfg.ptq.methods))


def row(pool: Pool, method: str, bits: tuple[int, int | None], **overrides: Any) -> dict[str, Any]:
    """Quantize every expert with ``method`` at ``bits``, merge them, evaluate: one row."""
    t0 = time.perf_counter()
    qexperts = pool.quantize_experts(method, pool.qconfig(bits), **overrides)
    seconds = time.perf_counter() - t0
    return {
        "method": method, "w_bits": bits[0], "a_bits": bits[1],
        "experts": {d: accuracy(q, pool.tests[d], device=pool.device) for d, q in qexperts.items()},
        "ptq": {d: ptq_report(q) for d, q in qexperts.items()},
        "merged": pool.merge_and_evaluate(list(qexperts.values())),
        "seconds": seconds, "seconds_per_expert": seconds / len(qexperts),
    }


def header(pool: Pool) -> dict[str, Any]:
    return {"benchmark": pool.bench.name, "targets": pool.targets, "seed": pool.seed, "preset": pool.cfg.preset}


def run(config: Config, out: str | Path, progress: bool = False,
        on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every row of ``config`` into ``out`` (resuming what is there); the results dict."""
    store = RunDir(out, "run")
    pool = Pool(config, progress)
    cfg, done = store.begin(pool.cfg)
    results: dict[str, Any] = {**header(pool), **pool.fp_results(), "rows": []}
    return store.fill(results, plan(cfg), done, set(plan(pool.cfg)), lambda key: row(pool, key[0], key[1:]), on_row)
