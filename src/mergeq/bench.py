"""``mergeq bench``: a grid of methods x bit pairs x target sets x seeds, resumable.

The grid comes from a YAML file::

    preset: quick                 # any RunConfig field may be set here (arch, calib_size, ...)
    methods: [rtn, brecq, qdrop, hdrq]
    bits: [W8A8, W8A4, W4A8, W4A4, W3A3]
    target_sets: [[uci, mnistm, rotated]]
    seeds: [0, 1, 2]

Cells run with one torch thread unless the grid sets ``threads`` (training and reconstruction
repeat bit for bit only per thread count, and Ray workers default to one), so the ``local`` and
``ray`` executors give identical numbers; parallelism comes from running cells side by side.
Every cell (target set, seed, bits, method) writes ``cells/<key>.json`` atomically into the
output folder when it finishes; a rerun, under either executor, skips cells whose file
exists. A cell is computed under an exclusive lock (``.locks/<key>.lock``, released by the OS
when its holder dies), so runs started side by side on one ``out`` split the cells: a cell
locked by another process is put off, then waited for (and computed if that process died).
Pool workers exit when their parent process dies. ``local`` runs cells in a process pool (``workers``); ``ray`` submits each cell as a
Ray task (to ``address``, or a local Ray instance) holding one CPU, or one GPU when the grid
sets ``device: cuda``; ``out`` and ``cache_dir`` are made absolute on the driver, so they must
name the same (shared) folder on every node. The tables (``bench.csv``, ``bench.md``)
are rebuilt from the cell files at the end.
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .config import RunConfig
from .errors import ConfigError, MergeqError
from .io import atomic_write_text, check_out_dir, file_lock, read_json, write_json
from .quant.config import parse_bits
from .typecheck import check_fields, check_unique

log = logging.getLogger(__name__)
GRID_KEYS = ("methods", "bits", "target_sets", "seeds")
_AXIS_TYPES = {"methods": list[str], "bits": list[str], "target_sets": list[list[str]], "seeds": list[int]}


@dataclass(frozen=True)
class Cell:
    targets: tuple[str, ...]
    seed: int
    bits: str
    method: str

    @property
    def key(self) -> str:
        return f"{'+'.join(self.targets)}__seed{self.seed}__{self.bits}__{self.method}"


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """Read a grid YAML; return the RunConfig fields shared by all cells and the cells."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path} must hold a YAML mapping")
    missing = [k for k in GRID_KEYS if k not in data]
    if missing:
        raise ConfigError(f"grid file {path} lacks {missing}; it needs {list(GRID_KEYS)}")
    check_fields({k: data[k] for k in GRID_KEYS}, _AXIS_TYPES)
    check_unique("seeds", data["seeds"])
    check_unique("target_sets", [tuple(t) for t in data["target_sets"]], data["target_sets"])
    for t in data["target_sets"]:
        check_unique("each target set", t)
    base = {k: v for k, v in data.items() if k not in GRID_KEYS}
    RunConfig.from_dict({**base, "methods": data["methods"], "bits": data["bits"]})  # validate early
    cells = [Cell(tuple(t), int(s), b, m) for t, s, b, m in
             itertools.product(data["target_sets"], data["seeds"], data["bits"], data["methods"])]
    return base, cells


def _cell_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.key}.json"


def read_cell(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except MergeqError as e:
        raise MergeqError(f"bench cell {e}; delete the file to recompute the cell") from None


def run_cell(base: dict[str, Any], cell: Cell, out: str, wait: bool = True) -> dict[str, Any] | None:
    """Compute one cell and write its JSON; safe to call in a worker process or a Ray task.

    The cell is computed under its lock; if another process holds it, return None at once
    (``wait=False``) or wait for it and return that process's result (computing the cell if
    it died first)."""
    import torch

    from .pipeline import Experiment
    from .quant import QuantConfig

    path = _cell_path(out, cell)
    with file_lock(Path(out) / ".locks" / f"{cell.key}.lock", blocking=wait) as mine:
        if not mine:
            return None
        if path.exists():  # finished by another process meanwhile
            return read_cell(path)
        log.info("computing cell %s", cell.key)
        # one thread per cell unless the grid says otherwise: every executor then computes the same bits
        cfg = RunConfig.from_dict({**base, "targets": list(cell.targets), "seed": cell.seed, "methods": [cell.method],
                                   "bits": [cell.bits], "threads": base.get("threads") or 1})
        threads = torch.get_num_threads()
        try:
            exp = Experiment(cfg)
            w, a = parse_bits(cell.bits)
            row = exp.row(cell.method, QuantConfig(w, a, exp.cfg.first_last_bits, exp.cfg.step_method))
            row["fp_merged"] = exp.fp_merged()  # the reference: the same experts, not quantized
        finally:
            torch.set_num_threads(threads)  # a cell run in-process leaves the caller's setting alone
        result = {"key": cell.key, "targets": list(cell.targets), "seed": cell.seed, "bits": cell.bits, **row}
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


def _exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: exit as soon as the parent process is gone (killed or crashed)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _local(base, out, workers: int, started: Callable[[str], None]) -> Runner:
    def runner(cells: list[Cell], wait: bool):
        if workers <= 1:
            for c in cells:
                started(c.key)
                yield c, run_cell(base, c, out, wait)
            return
        started(f"{min(workers, len(cells))} cells in parallel")
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_cell, base, c, out, wait): c for c in cells}
            for f in as_completed(futures):
                yield futures[f], f.result()

    return runner


def _ray(base, out, address: str | None, started: Callable[[str], None]) -> Runner:
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs Ray: pip install 'mergeq[ray]'") from None
    # a local instance (no address): no usage-stats reporting, no dashboard; nothing needs the network
    local = {} if address not in (None, "local") else {"include_dashboard": False}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **local)
    # absolute paths: a worker on another node (or with another cwd) writes where this driver reads
    out = str(Path(out).resolve())
    base = {**base, "cache_dir": str(Path(base.get("cache_dir", RunConfig.cache_dir)).resolve())}
    # a cuda cell holds one GPU (Ray then sets CUDA_VISIBLE_DEVICES for it); other cells one CPU
    task = ray.remote(num_gpus=1 if str(base.get("device", "cpu")).startswith("cuda") else 0)(run_cell)

    def runner(cells: list[Cell], wait: bool):
        pending = {task.remote(base, c, out, wait): c for c in cells}
        started(f"{len(pending)} cells submitted to Ray")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    return runner


def _check_same_settings(out: Path, base: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` if its grid was run with other shared settings (the axes may grow)."""
    previous = out / "grid.yaml"
    if not previous.exists():
        return
    old = {k: v for k, v in (yaml.safe_load(previous.read_text()) or {}).items() if k not in GRID_KEYS}
    if old != base:
        changed = sorted(k for k in set(old) | set(base) if old.get(k) != base.get(k))
        raise ValueError(f"{out} holds cells of a grid with other settings ({', '.join(changed)} differ): "
                         "its finished cells would be mixed with new ones; use another --out or delete it")


def run_grid(grid: str | Path, out: str | Path, executor: str = "local", workers: int = 1,
             address: str | None = None, progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Run every unfinished cell of ``grid`` into ``out``; return all cell results.

    ``progress(done, total, text)`` is called when cells start (``done`` unchanged) and when
    each finishes, with the cell, its hmean and an estimate of the time left."""
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be local or ray, got {executor!r}")
    base, cells = load_grid(grid)
    out = check_out_dir(out)
    with file_lock(out / ".locks" / "grid.lock"):  # two runs starting at once: the second sees the first's grid
        _check_same_settings(out, base)
        atomic_write_text(out / "grid.yaml", Path(grid).read_text())
    (out / "cells").mkdir(exist_ok=True)
    todo = [c for c in cells if not _cell_path(out, c).exists()]
    for c in cells:
        if c not in todo:
            read_cell(_cell_path(out, c))  # a damaged cell file is named before any work
    log.info("%d of %d cells to run", len(todo), len(cells))
    done = 0
    report = progress or (lambda i, n, text: None)
    started = lambda what: report(done, len(todo), f"running {what}")  # noqa: E731
    if executor == "local":
        runner = _local(base, str(out), workers, started)
    else:
        runner = _ray(base, str(out), address, started)
    t0 = time.perf_counter()
    for done, res in enumerate(_split_with_others(runner, todo), start=1):
        eta = (time.perf_counter() - t0) / done * (len(todo) - done)
        report(done, len(todo), f"{res['key']} done, hmean {100 * res['merged']['hmean']:.1f}%, ~{eta:.0f} s left")
    results = [read_cell(_cell_path(out, c)) for c in cells]
    write_tables(results, out)
    return results


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def table2(results: list[dict]) -> str:
    """Paper Table 2 form: merged hmean (mean ± std over seeds), own-domain expert accuracy in
    parentheses, one table per target set, best mean per column in bold; a first row with the
    full-precision merge of the same experts when the cells carry it."""
    lines = []
    for targets in dict.fromkeys(tuple(r["targets"]) for r in results):
        rs = [r for r in results if tuple(r["targets"]) == targets]
        bits = list(dict.fromkeys(r["bits"] for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        seeds = sorted({r["seed"] for r in rs})
        cell = {(m, b): [r for r in rs if r["method"] == m and r["bits"] == b] for m in methods for b in bits}
        best = {b: max(statistics.mean(r["merged"]["hmean"] for r in cell[(m, b)]) for m in methods) for b in bits}
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
                h = [r["merged"]["hmean"] for r in sel]
                text = _mean_sd(h)
                if statistics.mean(h) == best[b]:
                    text = f"**{text}**"
                exp_acc = statistics.mean(statistics.mean(r["experts"].values()) for r in sel)
                cols.append(f"{text} ({100 * exp_acc:.1f})")
            lines.append(f"| {m} | " + " | ".join(cols) + " |")
        lines.append("")
    return "\n".join(lines)


def write_tables(results: list[dict], out: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["targets", "seed", "bits", "method", "merged_hmean", "expert_mean", "seconds"])
    for r in results:
        w.writerow(["+".join(r["targets"]), r["seed"], r["bits"], r["method"], f"{r['merged']['hmean']:.4f}",
                    f"{statistics.mean(r['experts'].values()):.4f}", f"{r['seconds']:.1f}"])
    atomic_write_text(out / "bench.csv", buf.getvalue())
    atomic_write_text(out / "bench.md", table2(results))
