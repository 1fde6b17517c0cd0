"""An experiment's output folder: the one resume rule and the one writer of its files.

A results folder belongs to one command: every command that writes one (``run``, ``pmq``,
``tta``, ``bench``, ``compare``, ``barrier``, ``surface``) holds ``.locks/out.lock`` while it
writes (:func:`claimed`; ``bench`` shares it with other ``bench`` runs, which split the cells)
and refuses a folder holding another command's results (:func:`check_kind`).

Every experiment (``run``, ``pmq``, ``tta``, ``bench``) writes into ``--out`` the resolved
``config.yaml`` first, then ``results.json`` and ``results.md`` after every row, and at the end
its pictures (:mod:`mergeq.experiments.report`); all atomically (temp file, then rename).

The resume rule: a folder that already holds results is resumed iff they are results of the same
experiment whose config differs from this one at most in the experiment's *axes* (``run``:
``ptq.methods``, ``ptq.bits``; ``pmq``: ``pmq.merges``, ``pmq.methods``, ``pmq.bits``; ``tta``:
``tta.methods``, ``tta.bits``, ``tta.streams``; ``bench``: those of ``run`` plus
``grid.target_sets``, ``grid.seeds``, ``grid.ptq_seeds``, which is not unset or set where it was
the other), in the options of methods only one of the two runs names,
in sections the experiment does not read, and in ``runtime.cache_dir``. Both configs are
compared resolved (folders of the earlier flat form too). The recorded config then holds the
union of both runs' axes, every earlier row is kept as it was, and only missing rows are
computed: rows are never dropped. Any other difference is refused before any model is trained,
naming the keys, as is a folder whose results cannot be read or matched to a config; a bench
folder with cell files but no results yet is compared with its ``config.yaml`` (or the earlier
``grid.yaml``).

``results.json`` records the config its rows were computed with (``config``; the comparison
uses it, so an edited ``config.yaml`` cannot relabel the rows) and, per row (``bench``: per cell
file), ``settings_sha256`` (:func:`settings_sha256`), which a resumed run checks. A second run
into a folder being written waits for the lock, then resumes (or is refused) by this rule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

import yaml

from ..errors import MergeqError
from ..io import (atomic_write_text, check_out_dir, config_diff, earlier_results, file_lock, parse_yaml,
                  read_json, read_text, write_json)
from .config import Config, resolve, set_path

log = logging.getLogger(__name__)
PER_METHOD = ("ptq.options", "merge.options")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What the store needs to know of an experiment kind."""

    name: str
    axes: tuple[str, ...]  # list-valued config paths whose union a resumed run records
    ignored: tuple[str, ...]  # config paths (prefixes) the experiment does not read
    row_key: Callable[[dict], Hashable]
    row_methods: Callable[[dict], dict[str, set]] = lambda r: {}  # per PER_METHOD path: the methods a row uses


def _tta_methods(row: dict) -> dict[str, set]:
    from .config import parse_tta_method

    return {"ptq.options": {parse_tta_method(row["method"])[0]}, "merge.options": set()}


EXPERIMENTS = {e.name: e for e in (
    Experiment("run", ("ptq.methods", "ptq.bits"), ("pmq", "tta", "grid"),
               lambda r: (r["method"], r["w_bits"], r["a_bits"]),
               lambda r: {"ptq.options": {r["method"]}, "merge.options": {"average"}}),
    Experiment("pmq", ("pmq.merges", "pmq.methods", "pmq.bits"),
               ("ptq.methods", "ptq.bits", "merge.rounding", "merge.rounding_options", "merge.repeats", "tta", "grid"),
               lambda r: (r["merge"], r["method"], r["w_bits"], r["a_bits"]),
               lambda r: {"ptq.options": {r["method"]}, "merge.options": {r["merge"]}}),
    Experiment("tta", ("tta.methods", "tta.bits", "tta.streams"),
               ("data.targets", "ptq.methods", "ptq.bits", "merge", "pmq", "grid"),
               lambda r: (r["stream"], r["method"], r["bits"]), _tta_methods),
    Experiment("bench", ("ptq.methods", "ptq.bits", "grid.target_sets", "grid.seeds", "grid.ptq_seeds"),
               ("pmq", "tta", "runtime.workers"),
               lambda r: r["key"],
               lambda r: {"ptq.options": {r["method"]}, "merge.options": {"average"}}),
)}


def _kind_of(results: Any) -> str | None:
    """The command of a results.json (files written before it was recorded: by their rows); None
    for a file no mergeq command wrote."""
    if isinstance(results, dict) and isinstance(results.get("experiment"), str):
        return results["experiment"]
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list):
        return None
    row = rows[0] if rows and isinstance(rows[0], dict) else {}
    return "tta" if "stream" in row else "pmq" if "merge" in row else "run"


RESULT_FILES = ("results.json", "config.yaml", "results.md", "barrier.json", "surface.json", "cells", "grid")


def check_kind(out: Path, command: str) -> None:
    """Refuse ``out`` if it holds another command's results (by its results.json, else by
    ``cells/`` (bench), ``grid/`` (compare), ``barrier.json`` or ``surface.json``), naming them."""
    res = out / "results.json"
    if res.exists():
        kind = _kind_of(read_json(res))
        if kind is None:
            raise MergeqError(f"{res} is not a results file of a mergeq command (it names no experiment and holds "
                              "no rows): choose another --out")
    else:
        marks = {"cells": "bench", "grid": "compare", "barrier.json": "barrier", "surface.json": "surface"}
        kind = next((k for name, k in marks.items() if (out / name).exists()), None)
    if kind not in (None, command):
        there = ", ".join(n + "/" * (out / n).is_dir() for n in RESULT_FILES if (out / n).exists())
        raise MergeqError(f"{out} holds a `{kind}` result ({there}); {command} writes its own folder: "
                          "choose another --out")


@contextlib.contextmanager
def claimed(out: Path, command: str, shared: bool = False) -> Iterator[None]:
    """Hold ``out/.locks/out.lock`` (:func:`mergeq.io.file_lock`; ``shared``: with other holders
    of a shared lock) for the ``with`` block, waiting while another process holds it, then
    :func:`check_kind` ``out``."""
    lock = out / ".locks" / "out.lock"
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(file_lock(lock, blocking=False, shared=shared)):
            log.warning("%s is being written by another mergeq process: waiting for it to finish", out)
            stack.enter_context(file_lock(lock, shared=shared))
        check_kind(out, command)
        yield


def _earlier_cells(out: Path) -> tuple[dict, dict] | None:
    """A bench folder begun but with no results.json yet (running, interrupted, or written before
    issue 16 with ``grid.yaml``): its grid config, and no rows (the cells are read from their files)."""
    if not (out / "cells").is_dir():
        return None
    for name in ("config.yaml", "grid.yaml"):
        if (out / name).is_file():
            try:
                return parse_yaml(read_text(out / name), str(out / name)), {"experiment": "bench", "rows": []}
            except MergeqError as e:
                raise MergeqError(f"{e}: use another --out") from None
    if any((out / "cells").glob("*.json")):
        raise MergeqError(f"{out} holds bench cells but no config.yaml to resume from: use another --out")
    return None


def _get(d: dict, path: str) -> Any:
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _drop(d: dict, path: str) -> None:
    *head, last = path.split(".")
    for key in head:
        d = d.get(key) if isinstance(d, dict) else None
    if isinstance(d, dict):
        d.pop(last, None)


def _settings(d: dict, exp: Experiment, common: dict[str, set]) -> dict:
    """The parts of a config dict that must agree for rows to be reused."""
    d = yaml.safe_load(yaml.safe_dump(d))  # a deep copy in YAML's types
    for path in (*exp.axes, *exp.ignored, "runtime.cache_dir"):  # where models are cached changes no number
        _drop(d, path)
    for path, keep in common.items():
        opts = _get(d, path)
        if isinstance(opts, dict):
            for k in [k for k in opts if k not in keep]:
                del opts[k]
    return d


def _row_settings(config: dict, exp: Experiment, row: dict) -> dict:
    """The settings a row of ``exp`` is computed with: the config less the axes, the sections
    ``exp`` does not read, the options of methods the row does not use and ``runtime.workers``
    (which changes no number)."""
    settings = _settings(config, exp, exp.row_methods(row))
    _drop(settings, "runtime.workers")
    return settings


def settings_sha256(config: dict, exp: Experiment, row: dict) -> str:
    """SHA-256 of :func:`_row_settings`."""
    return hashlib.sha256(json.dumps(_row_settings(config, exp, row), sort_keys=True, default=str).encode()).hexdigest()


def settings_diff(recorded: Any, config: dict, exp: Experiment, row: dict) -> list[tuple[str, Any, Any]]:
    """(path, recorded value, value in ``config``) where a row's ``recorded`` config differs from
    ``config`` in its settings; paths one of them leaves unset are left out (a recorded config may
    be resolved further, e.g. by the data splits it loaded)."""
    if not isinstance(recorded, dict):
        return []
    old, new = _row_settings(recorded, exp, row), _row_settings(config, exp, row)
    return [(p, _get(old, p), _get(new, p)) for p in config_diff(old, new)
            if _get(old, p) is not None and _get(new, p) is not None]


REFUSE_VALUES = 4
"""Differing settings whose two values a refused folder's message shows (the rest: named only)."""


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (ending in ``...``) if longer."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RunDir:
    """The output folder of one experiment (see the module docstring)."""

    def __init__(self, out: str | Path, experiment: str) -> None:
        self.out = check_out_dir(out)
        self.exp = EXPERIMENTS[experiment]
        self.recorded: Config | None = None

    def locked(self, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """:func:`claimed` ``--out``: a second run into the same folder waits for the first, then
        resumes from its rows (``bench`` runs share the lock and split the cells)."""
        return claimed(self.out, self.exp.name, shared)

    def begin(self, cfg: Config) -> tuple[Config, dict[Hashable, dict]]:
        """The config to record (written to ``config.yaml`` now) and the rows to reuse, by row key."""
        self.recorded, done = self._begin(cfg)
        return self.recorded, done

    def _begin(self, cfg: Config) -> tuple[Config, dict[Hashable, dict]]:
        earlier = earlier_results(self.out)
        if earlier is None and self.exp.name == "bench":
            earlier = _earlier_cells(self.out)
        if earlier is None:
            atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
            return cfg, {}
        old_raw, old_results = earlier
        if isinstance(old_results.get("config"), dict):  # what the rows were computed with (config.yaml is a copy)
            old_raw = old_results["config"]
        if isinstance(old_raw.get("merge"), dict) and "recalibrate" not in old_raw["merge"]:
            old_raw = {**old_raw, "merge": {**old_raw["merge"], "recalibrate": "none"}}  # merged data-free then
        try:  # resolved, as this run's config is (a bench grid of the earlier form was recorded unresolved)
            old = resolve(Config.from_dict(old_raw, f"{self.out / 'config.yaml'}"))
        except MergeqError as e:
            raise MergeqError(f"{self.out} holds results whose config.yaml mergeq cannot read ({e}): "
                              "use another --out") from None
        new_d, old_d = cfg.to_dict(), old.to_dict()
        common = {p: set(_get(old_d, p) or {}) & set(_get(new_d, p) or {}) for p in PER_METHOD}
        old_s, new_s = _settings(old_d, self.exp, common), _settings(new_d, self.exp, common)
        diff = [(p, _get(old_s, p), _get(new_s, p)) for p in config_diff(old_s, new_s)]
        diff += [(p, _get(old_d, p), _get(new_d, p)) for p in self.exp.axes
                 if (_get(old_d, p) is None) != (_get(new_d, p) is None)]
        if diff:
            self._refuse(diff)
        for path in self.exp.axes:  # unset in both (an optional axis) or set in both: see the check above
            old_items, new_items = _get(old_d, path), _get(new_d, path)
            if old_items is not None:
                set_path(new_d, path, old_items + [x for x in new_items if x not in old_items])
        for path in PER_METHOD:
            set_path(new_d, path, {**(_get(old_d, path) or {}), **(_get(new_d, path) or {})})
        union = Config.from_dict(new_d)
        self._check_rows(old_results["rows"], union.to_dict())
        atomic_write_text(self.out / "config.yaml", union.to_yaml())
        return union, {self.exp.row_key(r): r for r in old_results["rows"]}

    def _check_rows(self, rows: list[dict], config: dict) -> None:
        """Each recorded row's settings hash (rows written before issue 24 have none) must be this run's
        (``bench``: its rows are cells, whose hash is of the cell's config: checked when read)."""
        for r in rows if self.exp.name != "bench" else []:
            if "settings_sha256" in r and r["settings_sha256"] != settings_sha256(config, self.exp, r):
                raise MergeqError(f"{self.out / 'results.json'}: row {self.exp.row_key(r)} was computed with other "
                                  "settings than this run's (its settings_sha256 differs; was results.json edited?): "
                                  "use another --out")

    def _refuse(self, diff: list[tuple[str, Any, Any]]) -> None:
        """Refuse the folder, naming each differing setting and (the first few) with both values."""
        shown = [f"{p}: {_short(a)} recorded, {_short(b)} now" for p, a, b in diff[:REFUSE_VALUES]]
        if len(diff) > REFUSE_VALUES:
            shown.append(f"and {len(diff) - REFUSE_VALUES} more")
        raise MergeqError(f"{self.out} holds results of a run with other settings ({', '.join(p for p, _, _ in diff)} "
                          f"differ) [{'; '.join(shown)}]; its rows would be mixed with new ones: use another --out, "
                          "or these settings as they were there")

    def fill(self, results: dict[str, Any], keys: list[Hashable], done: dict[Hashable, dict],
             todo: set[Hashable], compute: Callable[[Hashable], dict],
             on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """``results["rows"]``: every row of ``keys`` (the recorded config's plan), reused from ``done``
        or, if this run asked for it (``todo``), computed by ``compute(key)``; saved after each row,
        earlier rows outside ``keys`` kept at the end. The files and pictures are written at the end."""
        def ordered() -> list[dict]:
            return [done[k] for k in dict.fromkeys([*keys, *done]) if k in done]

        config = self.recorded.to_dict()
        results["config"] = config
        for key in keys:
            if key in done:
                log.info("resuming: row %s already done", key)
            elif key in todo:
                done[key] = compute(key)
                done[key]["settings_sha256"] = settings_sha256(config, self.exp, done[key])
            else:  # a row of the recorded union that neither run asked for
                continue
            results["rows"] = ordered()
            self.write(results)
            if on_row:
                on_row(done[key])
        results["rows"] = ordered()
        self.finish(results)
        return results

    def write(self, results: dict[str, Any]) -> None:
        """``results.json`` and ``results.md`` (after every row)."""
        from .report import markdown

        write_json(self.out / "results.json", {"experiment": self.exp.name, **results})
        atomic_write_text(self.out / "results.md", markdown({"experiment": self.exp.name, **results}))

    def finish(self, results: dict[str, Any]) -> None:
        """The files and the pictures, once all rows are done."""
        from .report import pictures

        pictures({"experiment": self.exp.name, **results}, self.out)
        self.write(results)

