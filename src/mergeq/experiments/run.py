"""Quantize, then merge (HDRQ's setting, paper Sec. 3 and 5): ``mergeq run``.

source --SHOT--> expert per target --PTQ--> quantized experts --average--> one low-bit model,
evaluated per target domain with the harmonic mean. Rows: every method at every bit pair of
``ptq`` (grouped by bits), merged with ``merge.rounding`` (``merge.repeats`` sampling merges
averaged, see :meth:`Pool.merge_and_evaluate`). Files and resume: :mod:`mergeq.experiments.store`.

results.json: {"experiment": "run", "benchmark", "targets", "seed", "preset", "source" (the source
model before adaptation, every domain), "steps" ({"source": n, "shot": {d: n}}: optimizer steps),
"fp": {"experts": {d: acc}, "merged": {d: acc, "hmean"}},
"fp_bn_mixture" (merge of unfolded experts with mixed BN statistics), "rows": [{"method",
"w_bits", "a_bits", "experts": {d: acc}, "ptq": {d: {"changed_codes", "recon_loss": {unit: err}}},
"merged": {d: acc, "hmean"[, "repeats": {"seeds", "hmeans", "std"}]}[, "merged_data_free": the same
without recalibration (``merge.data_free_row``)], "seconds",
"seconds_per_expert"}], "compute": {"threads", "workers", "row_threads"} (of the rows computed in
the latest run)}; accuracies are fractions.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from ..gpu import worker_devices
from ..quant.config import parse_bits
from ..sysinfo import environment
from . import health
from .config import Config, check_average_weights
from .pool import Pool, ptq_report, start_worker
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
        "experts": {d: pool.score(q, d) for d, q in qexperts.items()},
        "ptq": {d: ptq_report(q) for d, q in qexperts.items()},
        "merged": pool.merge_and_evaluate(list(qexperts.values())),
        **({"merged_data_free": pool.merge_and_evaluate(list(qexperts.values()), recalibrate="none")}
           if pool.cfg.merge.data_free_row and pool.cfg.merge.recalibrate != "none" else {}),
        "seconds": seconds, "seconds_per_expert": seconds / len(qexperts),
    }


def header(pool: Pool) -> dict[str, Any]:
    """What every results file starts with, the machine included (its CPU kind changes float rounding)."""
    return {"benchmark": pool.bench.name, "targets": pool.targets, "seed": pool.seed, "preset": pool.cfg.preset,
            "machine": environment()}


def _row_in_worker(config: dict[str, Any], key: tuple, threads: int, row_threads: int) -> dict[str, Any]:
    """One row in a worker process: the pool's models read from the cache under the parent's
    thread count (part of their cache key), the row computed with ``row_threads`` threads."""
    torch.set_num_threads(threads)
    pool = Pool(Config.from_dict(config).updated({"runtime.threads": threads}))
    pool.experts, pool.source  # noqa: B018 (read from the cache, which the parent filled)
    torch.set_num_threads(row_threads)
    return row(pool, key[0], key[1:])


def default_workers(device: str, threads: int) -> int:
    """Row processes when ``runtime.workers`` is null: one per torch thread on a CPU, one per
    visible GPU on ``cuda`` (each pinned to its own: :func:`mergeq.gpu.worker_devices`), one on
    ``cuda:N`` or another device (processes on one GPU would each hold a CUDA context there)."""
    return threads if torch.device(device).type == "cpu" else len(worker_devices(device, None))


def checked(on_row: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """``on_row`` after :func:`health.check_merged` of the row."""
    def check(r: dict) -> None:
        a = r["a_bits"] if r["a_bits"] is not None else 32
        health.check_merged(f"{r['method']} W{r['w_bits']}A{a}", r["experts"], r["merged"])
        if on_row:
            on_row(r)

    return check


def run(config: Config, out: str | Path, progress: bool = False,
        on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every row of ``config`` into ``out`` (resuming what is there); the results dict.

    The models are trained here; the rows still to compute then run side by side in ``workers``
    spawned processes (``runtime.workers``; None: :func:`default_workers`, at most one per row), each
    with ``threads // workers`` torch threads and exiting if this process dies. Rows are recorded,
    and written, in plan order; ``results["compute"]`` records the thread count and workers."""
    store = RunDir(out, "run")
    with store.locked():
        return _fill(store, config, progress, on_row)


def _fill(store: RunDir, config: Config, progress: bool, on_row: Callable[[dict], None] | None) -> dict[str, Any]:
    """The rows of ``config`` into ``store``, under its lock on ``--out``."""
    pool = Pool(config, progress)
    check_average_weights(pool.cfg, len(pool.targets))
    cfg, done = store.begin(pool.cfg)
    results: dict[str, Any] = {**header(pool), **pool.fp_results(), "rows": []}
    keys, todo = plan(cfg), set(plan(pool.cfg))
    pending = [k for k in keys if k in todo and k not in done]
    threads = torch.get_num_threads()
    on_row = checked(on_row)
    workers = max(1, min(pool.cfg.runtime.workers or default_workers(pool.device, threads), len(pending)))
    row_threads = threads if workers == 1 else max(1, threads // workers)
    results["compute"] = {"threads": threads, "workers": workers, "row_threads": row_threads}
    if workers == 1:
        return store.fill(results, keys, done, todo, lambda key: row(pool, key[0], key[1:]), on_row)
    ctx = get_context("spawn")
    devices = ctx.SimpleQueue()  # the GPU of each worker process (None: not pinned)
    for device in worker_devices(pool.device, workers):
        devices.put(device)
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=start_worker,
                                   initargs=(os.getpid(), devices))
    try:
        futures = {k: executor.submit(_row_in_worker, pool.cfg.to_dict(), k, threads, row_threads) for k in pending}
        return store.fill(results, keys, done, todo, lambda key: futures[key].result(), on_row)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
