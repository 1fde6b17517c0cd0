"""``mergeq bench``: ``mergeq run`` over a grid of methods x bit pairs x target sets x seeds, resumable.

The grid is a config (``mergeq bench GRID.yaml``) whose axes are ``ptq.methods``, ``ptq.bits``,
``grid.target_sets`` (default: ``[data.targets]``), ``grid.seeds`` (default: ``[runtime.seed]``)
and, if set, ``grid.ptq_seeds`` (PTQ seeds on the experts of each seed)::

    preset: quick
    ptq: {methods: [rtn, brecq, qdrop, hdrq], bits: [W8A8, W8A4, W4A8, W4A4, W3A3]}
    grid: {target_sets: [[uci, mnistm, noisy]], seeds: [0, 1, 2]}

A cell is the grid's config with one value per axis (``data.targets``, ``runtime.seed``, one
method, one bit pair, and a PTQ seed as ``runtime.seeds.ptq`` and ``runtime.seeds.calib``). Cells
run with one torch thread unless the config sets ``runtime.threads`` (training and
reconstruction repeat bit for bit only per thread count, and Ray workers default to one), so
the ``local`` and ``ray`` executors give identical numbers; parallelism comes from running cells
side by side. Every cell writes ``cells/<key>.json`` (its
row, its full-precision merge, its resolved config, which ``mergeq run --config`` reruns, and
the ``settings_sha256`` of the config it was computed with) atomically when it finishes; a
rerun, under either executor, skips cells whose file exists. ``config.yaml`` records the grid;
resuming follows :mod:`mergeq.experiments.store`'s rule (the axes may grow; anything else that
differs is refused). Every cell file read is checked (:func:`read_cell`): its key must be its
file's and its settings the grid's, else the run stops naming the file, before any work. A
bench holds ``.locks/out.lock`` shared (other commands wait for it); the grid check and
``config.yaml`` run under ``.locks/grid.lock`` and each cell under an exclusive lock
(``.locks/<key>.lock``, released by the OS when its holder dies), so runs started side by side
on one ``out`` with one grid split the cells (a cell locked by another process is put off, then
waited for, and computed if that process died), and a run with other settings is refused. Pool
workers exit when their parent process dies.
``local`` runs cells in a process pool (``runtime.workers``, default 1; on ``cuda`` one process
per visible GPU, each pinned to its own: :func:`mergeq.gpu.worker_devices`; changes no number);
``ray`` submits each cell as a Ray task (to ``address``, or a local Ray instance) holding one
CPU, or one GPU when ``runtime.device`` is cuda; ``out`` and ``runtime.cache_dir`` are made absolute on the driver, so they must name the
same (shared) folder on every node. ``results.json`` / ``results.md`` (paper Table 2 form),
``bench.csv`` and ``hmean_vs_bits.png`` are rebuilt from the cell files at the end.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import MergeqError
from ..gpu import memory_errors, worker_devices
from ..io import file_lock, read_json, write_json
from ..quant.config import parse_bits
from ..sysinfo import environment
from ..data import load_data
from .config import Config, resolve
from .pool import Pool, start_worker
from .store import EXPERIMENTS, RunDir, settings_diff, settings_sha256

log = logging.getLogger(__name__)
BENCH = EXPERIMENTS["bench"]


@dataclass(frozen=True)
class Cell:
    targets: tuple[str, ...]
    seed: int
    bits: str
    method: str
    ptq_seed: int | None = None

    @property
    def key(self) -> str:
        ptq = "" if self.ptq_seed is None else f"__ptq{self.ptq_seed}"
        return f"{'+'.join(self.targets)}__seed{self.seed}{ptq}__{self.bits}__{self.method}"

    def config(self, grid: Config) -> Config:
        """The cell's config: the grid's with one value per axis, one thread unless it sets threads."""
        p = self.ptq_seed
        ptq = {} if p is None else {"runtime.seeds.ptq": p, "runtime.seeds.calib": p}
        return grid.updated({"data.targets": list(self.targets), "runtime.seed": self.seed,
                             "ptq.methods": [self.method], "ptq.bits": [self.bits],
                             "runtime.threads": grid.runtime.threads or 1, "grid.target_sets": None,
                             "grid.seeds": None, "grid.ptq_seeds": None, **ptq})


def with_axes(cfg: Config) -> Config:
    """``cfg`` with ``grid.target_sets`` and ``grid.seeds`` filled in (their defaults made explicit)."""
    changes: dict[str, Any] = {}
    if cfg.grid.target_sets is None:
        targets = cfg.data.targets or list(load_data(dataclasses.asdict(resolve(cfg).data), cfg.runtime.seed).targets)
        changes["grid.target_sets"] = [targets]
    if cfg.grid.seeds is None:
        changes["grid.seeds"] = [cfg.runtime.seed]
    return cfg.updated(changes) if changes else cfg


def cells_of(cfg: Config) -> list[Cell]:
    g = cfg.grid
    return [Cell(tuple(t), s, b, m, p) for t, s, p, b, m in itertools.product(
        g.target_sets, g.seeds, g.ptq_seeds or [None], cfg.ptq.bits, cfg.ptq.methods)]


def cell_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.key}.json"


def _identity(cell: Cell) -> dict[str, Any]:
    return {"key": cell.key, "targets": list(cell.targets), "seed": cell.seed, "ptq_seed": cell.ptq_seed,
            "bits": cell.bits, "method": cell.method}


def read_cell(out: str | Path, cell: Cell, grid: Config) -> dict[str, Any]:
    """The result in ``cell``'s file under ``out``, whose key must be the cell's and whose settings
    (``settings_sha256``; cells written before issue 31 record none) those of ``grid``'s cell."""
    path = cell_path(out, cell)
    try:
        res = read_json(path)
    except MergeqError as e:
        raise MergeqError(f"bench cell {e}; delete the file to recompute the cell") from None
    if not isinstance(res, dict):
        raise MergeqError(f"bench cell {path} is not a JSON object; delete the file to recompute the cell")
    wrong = [k for k, v in _identity(cell).items() if res.get(k) != v]
    if wrong:
        raise MergeqError(f"bench cell {path} holds the cell {res.get('key')!r}, not {cell.key!r} ({', '.join(wrong)} "
                          "differ; copied from another cell's file?): delete the file to recompute the cell")
    want = cell.config(grid).to_dict()
    if "settings_sha256" in res and res["settings_sha256"] != settings_sha256(want, BENCH, res):
        diff = [f"{p}: {a!r} in the cell, {b!r} in the grid" for p, a, b in settings_diff(res.get("config"), want,
                                                                                          BENCH, res)]
        raise MergeqError(f"bench cell {path} was computed with other settings than the grid's "
                          f"{Path(out) / 'config.yaml'} ({'; '.join(diff) or 'its settings_sha256 differs'}): delete "
                          "the cell file to recompute it, or run with the settings it was computed with")
    return res


def compute_cell(cfg: Config) -> dict[str, Any]:
    """The row of a one-method, one-bits config and the full-precision merge of its experts."""
    import torch

    from .run import row

    threads = torch.get_num_threads()
    try:
        with memory_errors(cfg.runtime.device):  # said in the worker, whose GPU it is
            pool = Pool(cfg)
            result = row(pool, cfg.ptq.methods[0], parse_bits(cfg.ptq.bits[0]))
            return {"benchmark": pool.bench.name, **result, "fp_merged": pool.fp_merged(),
                    "config": pool.cfg.to_dict(), "machine": environment()}
    finally:
        torch.set_num_threads(threads)  # a cell run in-process leaves the caller's setting alone


def run_cell(grid: dict[str, Any], cell: Cell, out: str, wait: bool = True) -> dict[str, Any] | None:
    """Compute one cell and write its JSON; safe to call in a worker process or a Ray task.

    The cell is computed under its lock; if another process holds it, return None at once
    (``wait=False``) or wait for it and return that process's result (computing the cell if
    it died first)."""
    path, cfg = cell_path(out, cell), Config.from_dict(grid)
    with file_lock(Path(out) / ".locks" / f"{cell.key}.lock", blocking=wait) as mine:
        if not mine:
            return None
        if path.exists():  # finished by another process meanwhile
            return read_cell(out, cell, cfg)
        log.info("computing cell %s", cell.key)
        config = cell.config(cfg)
        result = {**_identity(cell), **compute_cell(config)}
        result["settings_sha256"] = settings_sha256(config.to_dict(), BENCH, result)
        write_json(path, result)
        return result


Runner = Callable[[list[Cell], bool], Iterable[tuple[Cell, "dict | None"]]]


def _split_with_others(runner: Runner, cells: list[Cell]) -> Iterable[dict]:
    """Run ``cells``; those another process is computing are put off, then waited for."""
    busy = []
    for cell, res in runner(cells, False):
        if res is None:
            busy.append(cell)
        else:
            yield res
    if busy:
        log.info("%d cells are being computed by another process: waiting for them", len(busy))
        yield from (res for _, res in runner(busy, True))


def _local(grid: dict, out: str, workers: int | None, started: Callable[[str], None]) -> Runner:
    devices = worker_devices(str(grid["runtime"]["device"]), workers)  # one process per GPU on cuda

    def runner(cells: list[Cell], wait: bool):
        if len(devices) <= 1:
            for c in cells:
                started(c.key)
                yield c, run_cell(grid, c, out, wait)
            return
        started(f"{min(len(devices), len(cells))} cells in parallel"
                + (f" on {len(set(devices))} GPUs" if devices[0] else ""))
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()  # each worker process takes its GPU (None: not pinned)
        for device in devices:
            queue.put(device)
        with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=start_worker,
                                 initargs=(os.getpid(), queue)) as pool:
            futures = {pool.submit(run_cell, grid, c, out, wait): c for c in cells}
            for f in as_completed(futures):
                yield futures[f], f.result()

    return runner


def _ray(grid: dict, out: str, address: str | None, started: Callable[[str], None]) -> Runner:
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs Ray: pip install 'mergeq[ray]'") from None
    device = str(grid["runtime"]["device"])
    if device.startswith("cuda:"):
        raise ValueError(f"the ray executor gives each cell the GPU Ray picks: set runtime.device to cuda, not {device}")
    # a local instance (no address): no usage-stats reporting, no dashboard; nothing needs the network
    local = {} if address not in (None, "local") else {"include_dashboard": False}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **local)
    # absolute paths: a worker on another node (or with another cwd) writes where this driver reads
    out = str(Path(out).resolve())
    grid = {**grid, "runtime": {**grid["runtime"], "cache_dir": str(Path(grid["runtime"]["cache_dir"]).resolve())}}
    # a cuda cell holds one GPU (Ray then sets CUDA_VISIBLE_DEVICES for it); other cells one CPU
    task = ray.remote(num_gpus=1 if device == "cuda" else 0)(run_cell)

    def runner(cells: list[Cell], wait: bool):
        pending = {task.remote(grid, c, out, wait): c for c in cells}
        started(f"{len(pending)} cells submitted to Ray")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    return runner


def run_grid(config: Config, out: str | Path, executor: str = "local", workers: int | None = None,
             address: str | None = None, progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Run every unfinished cell of the grid ``config`` into ``out``; return every cell result there.

    ``progress(done, total, text)`` is called when cells start (``done`` unchanged) and when
    each finishes, with the cell, its hmean and an estimate of the time left."""
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be local or ray, got {executor!r}")
    store = RunDir(out, "bench")
    with store.locked(shared=True):
        return _run_grid(store, config, executor, workers, address, progress)


def _run_grid(store: RunDir, config: Config, executor: str, workers: int | None, address: str | None,
              progress: Callable[[int, int, str], None] | None) -> list[dict]:
    """:func:`run_grid` under the shared lock on ``out``."""
    out, grid_lock = store.out, store.out / ".locks" / "grid.lock"
    requested = resolve(with_axes(config))  # the presets' choices recorded; data splits are per cell (seed)
    with file_lock(grid_lock):  # two runs starting at once: the second sees the first's grid
        recorded, _ = store.begin(requested)
        (out / "cells").mkdir(exist_ok=True)
    done_before = [c for c in cells_of(recorded) if cell_path(out, c).exists()]
    for c in done_before:
        read_cell(out, c, recorded)  # a damaged, misplaced or differently computed cell is named before any work
    cells = cells_of(requested)
    todo = [c for c in cells if c not in done_before]
    log.info("%d of %d cells to run", len(todo), len(cells))
    done = 0
    report = progress or (lambda i, n, text: None)
    started = lambda what: report(done, len(todo), f"running {what}")  # noqa: E731
    grid = recorded.to_dict()
    workers = workers or config.runtime.workers
    runner = _local(grid, str(out), workers, started) if executor == "local" else _ray(grid, str(out), address, started)
    t0 = time.perf_counter()
    for done, res in enumerate(_split_with_others(runner, todo), start=1):
        eta = (time.perf_counter() - t0) / done * (len(todo) - done)
        report(done, len(todo), f"{res['key']} done, hmean {100 * res['merged']['hmean']:.1f}%, ~{eta:.0f} s left")
    with file_lock(grid_lock):
        results = [read_cell(out, c, recorded) for c in cells_of(recorded) if cell_path(out, c).exists()]
        store.finish({"benchmark": results[0].get("benchmark", "") if results else "", "config": recorded.to_dict(),
                      "rows": results})
    return results
